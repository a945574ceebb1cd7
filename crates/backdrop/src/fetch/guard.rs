//! Where downloads may go. [`classify`] sorts an IP address into an [`AddressClass`]; an
//! [`AddressPolicy`] allows public addresses plus the API base's own kind (so the simulator on
//! 127.0.0.1 can serve its outputs); [`DownloadClient`] is the HTTP client that enforces it on
//! every address it connects to (its DNS resolver drops refused addresses, so a public-looking
//! name that resolves to a private address is caught) and on every redirect (http and https
//! only, at most [`MAX_REDIRECTS`], never from https to http).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use url::{Host, Url};

use crate::provider::ProviderError;
use crate::provider::http;

/// Redirects a download may follow. Output URLs are storage links; one or two hops (a CDN, a
/// signed URL) are normal, a long chain is not.
pub const MAX_REDIRECTS: usize = 3;

/// What kind of address an IP is, for deciding whether a download may connect to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AddressClass {
    /// A globally routable unicast address.
    Public,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// `10/8`, `172.16/12`, `192.168/16`.
    Private,
    /// `100.64/10`, carrier-grade NAT.
    Shared,
    /// `169.254/16`, `fe80::/10` (cloud metadata services live here).
    LinkLocal,
    /// `fc00::/7` unique local, and the deprecated site-local `fec0::/10`.
    UniqueLocal,
    /// `224/4`, `ff00::/8`.
    Multicast,
    /// `0.0.0.0/8`, `::`.
    Unspecified,
    /// `255.255.255.255`.
    Broadcast,
    /// `192.0.2/24`, `198.51.100/24`, `203.0.113/24`, `2001:db8::/32`, `3fff::/20`.
    Documentation,
    /// Everything else that is not routable: `240/4`, `192.0.0/24`, `198.18/15`, Teredo,
    /// IPv4-compatible IPv6, the discard prefix.
    Reserved,
}

impl std::fmt::Display for AddressClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Public => "public",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::Shared => "shared (carrier-grade NAT)",
            Self::LinkLocal => "link-local",
            Self::UniqueLocal => "unique-local",
            Self::Multicast => "multicast",
            Self::Unspecified => "unspecified",
            Self::Broadcast => "broadcast",
            Self::Documentation => "documentation",
            Self::Reserved => "reserved",
        })
    }
}

/// The class of `ip`. IPv6 forms that carry an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, the
/// NAT64 prefix `64:ff9b::/96`, 6to4 `2002::/16`) are judged by the IPv4 address they reach.
/// Hand-written: the standard library's `is_global` and friends are still unstable.
#[must_use]
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    use AddressClass::{
        Broadcast, Documentation, LinkLocal, Loopback, Multicast, Private, Public, Reserved, Shared,
        Unspecified,
    };
    match ip.octets() {
        [255, 255, 255, 255] => Broadcast,
        [0, ..] => Unspecified,
        [127, ..] => Loopback,
        [10, ..] | [172, 16..=31, ..] | [192, 168, ..] => Private,
        [100, 64..=127, ..] => Shared,
        [169, 254, ..] => LinkLocal,
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => Documentation,
        [192, 0, 0, _] | [198, 18..=19, ..] | [240..=255, ..] => Reserved,
        [224..=239, ..] => Multicast,
        _ => Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    use AddressClass::{
        Documentation, LinkLocal, Loopback, Multicast, Public, Reserved, UniqueLocal, Unspecified,
    };
    if ip.is_unspecified() {
        return Unspecified;
    }
    if ip.is_loopback() {
        return Loopback;
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let s = ip.segments();
    let low_v4 = || Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7]));
    match s {
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => classify_v4(low_v4()),
        // IPv4-compatible (deprecated); `::` and `::1` were handled above.
        [0, 0, 0, 0, 0, 0, _, _] => Reserved,
        [0x2002, hi, lo, ..] => classify_v4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))),
        [0x2001, 0x0db8, ..] => Documentation,
        [0x3fff, second, ..] if second & 0xf000 == 0 => Documentation,
        [0x2001, 0, ..] | [0x0100, 0, 0, 0, ..] => Reserved,
        [first, ..] if first & 0xfe00 == 0xfc00 => UniqueLocal,
        [first, ..] if first & 0xffc0 == 0xfe80 => LinkLocal,
        [first, ..] if first & 0xffc0 == 0xfec0 => UniqueLocal,
        [first, ..] if first & 0xff00 == 0xff00 => Multicast,
        _ => Public,
    }
}

/// Which addresses a download may connect to: public ones, and those of the same class as the
/// API base (a base on 127.0.0.1, like the simulator's, allows loopback; one on a private
/// network allows that network).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AddressPolicy {
    /// Classes allowed besides [`AddressClass::Public`].
    also: Vec<AddressClass>,
}

impl AddressPolicy {
    /// Public addresses only.
    #[must_use]
    pub fn public_only() -> Self {
        Self::default()
    }

    /// Public addresses and `classes`.
    #[must_use]
    pub fn allowing(classes: impl IntoIterator<Item = AddressClass>) -> Self {
        let mut also: Vec<AddressClass> =
            classes.into_iter().filter(|c| *c != AddressClass::Public).collect();
        also.sort_by_key(|c| *c as u8);
        also.dedup();
        Self { also }
    }

    /// Public addresses and the classes of the API base's own addresses: an IP literal's class,
    /// `localhost` as loopback, any other name resolved once here (if that fails, public only:
    /// the API itself is then unreachable too).
    pub async fn for_api_base(base: &str) -> Self {
        let Ok(url) = Url::parse(base) else { return Self::public_only() };
        match url.host() {
            Some(Host::Ipv4(ip)) => Self::allowing([classify(IpAddr::V4(ip))]),
            Some(Host::Ipv6(ip)) => Self::allowing([classify(IpAddr::V6(ip))]),
            Some(Host::Domain(name)) if name.eq_ignore_ascii_case("localhost") => {
                Self::allowing([AddressClass::Loopback])
            }
            Some(Host::Domain(name)) => {
                let port = url.port_or_known_default().unwrap_or(443);
                match tokio::net::lookup_host((name, port)).await {
                    Ok(addrs) => Self::allowing(addrs.map(|a| classify(a.ip()))),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot resolve the API base; downloads go to public addresses only");
                        Self::public_only()
                    }
                }
            }
            None => Self::public_only(),
        }
    }

    /// True when a download may connect to `ip`.
    #[must_use]
    pub fn allows(&self, ip: IpAddr) -> bool {
        let class = classify(ip);
        class == AddressClass::Public || self.also.contains(&class)
    }

    fn check_ip(&self, ip: IpAddr, host: &str) -> Result<(), Refused> {
        if self.allows(ip) {
            Ok(())
        } else {
            Err(Refused(format!(
                "{host} is a {} address ({ip}); downloads only go to public addresses or the API base's kind",
                classify(ip)
            )))
        }
    }
}

/// Why a download was not allowed to go somewhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(String);

/// Checks a URL a download is about to request: http or https, and, when its host is an IP
/// literal (which no resolver sees), an allowed address.
///
/// # Errors
/// [`Refused`] saying why.
pub fn check_url(url: &Url, policy: &AddressPolicy) -> Result<(), Refused> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Refused(format!("{} URLs are not downloaded (only http and https)", url.scheme())));
    }
    match url.host() {
        Some(Host::Ipv4(ip)) => policy.check_ip(IpAddr::V4(ip), &ip.to_string()),
        Some(Host::Ipv6(ip)) => policy.check_ip(IpAddr::V6(ip), &ip.to_string()),
        Some(Host::Domain(_)) => Ok(()),
        None => Err(Refused("the URL has no host".into())),
    }
}

/// Checks one redirect: `next` after the URLs in `previous` (the first is the URL asked for).
///
/// # Errors
/// [`Refused`] for a chain longer than [`MAX_REDIRECTS`], a scheme other than http or https, a
/// step from https down to http, or a refused IP literal.
pub fn check_redirect(next: &Url, previous: &[Url], policy: &AddressPolicy) -> Result<(), Refused> {
    if previous.len() > MAX_REDIRECTS {
        return Err(Refused(format!("more than {MAX_REDIRECTS} redirects")));
    }
    if next.scheme() == "http" && previous.iter().any(|u| u.scheme() == "https") {
        return Err(Refused("a redirect from https to http".into()));
    }
    check_url(next, policy).map_err(|Refused(why)| Refused(format!("redirect refused: {why}")))
}

/// Resolves names with the system resolver, then keeps only the addresses the policy allows:
/// the check applies to the address actually connected to, not just to the name.
struct GuardedResolver {
    policy: AddressPolicy,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: reqwest puts the URL's port (or the scheme's default) in its place.
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| match policy.check_ip(a.ip(), &host) {
                    Ok(()) => true,
                    Err(why) => {
                        refused.get_or_insert(why);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), refused) {
                (true, Some(why)) => Err(why.into()),
                _ => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// The HTTP client downloads use, with its [`AddressPolicy`] enforced on every connection and
/// redirect. Cheap to clone (one connection pool).
#[derive(Debug, Clone)]
pub struct DownloadClient {
    client: reqwest::Client,
    policy: AddressPolicy,
}

impl DownloadClient {
    /// A client whose requests time out after `request_timeout` (as the API client's do).
    ///
    /// # Errors
    /// [`ProviderError::Connect`] when the TLS backend cannot be set up.
    pub fn new(request_timeout: Duration, policy: AddressPolicy) -> Result<Self, ProviderError> {
        let redirects = policy.clone();
        let client = http::client_builder(request_timeout)
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                match check_redirect(attempt.url(), attempt.previous(), &redirects) {
                    Ok(()) => attempt.follow(),
                    Err(why) => attempt.error(why),
                }
            }))
            .dns_resolver(Arc::new(GuardedResolver { policy: policy.clone() }))
            .build()
            .map_err(|e| ProviderError::Connect(format!("cannot build the download client: {e}")))?;
        Ok(Self { client, policy })
    }

    /// The policy this client enforces.
    #[must_use]
    pub fn policy(&self) -> &AddressPolicy {
        &self.policy
    }

    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

/// The [`Refused`] somewhere in an error's chain, if a guard stopped the request.
pub(crate) fn refusal<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut source: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(refused) = err.downcast_ref::<Refused>() {
            return Some(refused);
        }
        source = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddressClass::{
        Broadcast, Documentation, LinkLocal, Loopback, Multicast, Private, Public, Reserved, Shared,
        UniqueLocal, Unspecified,
    };

    #[test]
    fn the_classifier_table() {
        let table: &[(&str, AddressClass)] = &[
            ("8.8.8.8", Public),
            ("1.1.1.1", Public),
            ("172.15.255.255", Public),
            ("172.32.0.1", Public),
            ("100.63.255.255", Public),
            ("100.128.0.1", Public),
            ("223.255.255.255", Public),
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("10.0.0.1", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("100.64.0.1", Shared),
            ("100.127.255.255", Shared),
            ("169.254.169.254", LinkLocal),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("255.255.255.255", Broadcast),
            ("192.0.2.10", Documentation),
            ("198.51.100.7", Documentation),
            ("203.0.113.9", Documentation),
            ("192.0.0.8", Reserved),
            ("198.18.0.1", Reserved),
            ("240.0.0.1", Reserved),
            ("2606:4700:4700::1111", Public),
            ("2a00:1450:4001::200e", Public),
            ("::1", Loopback),
            ("::", Unspecified),
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:10.1.2.3", Private),
            ("::ffff:169.254.169.254", LinkLocal),
            ("::ffff:8.8.8.8", Public),
            ("64:ff9b::a9fe:a9fe", LinkLocal),
            ("64:ff9b::808:808", Public),
            ("2002:c0a8:101::1", Private),
            ("2002:808:808::1", Public),
            ("::127.0.0.1", Reserved),
            ("fc00::1", UniqueLocal),
            ("fd12:3456:789a::1", UniqueLocal),
            ("fec0::1", UniqueLocal),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("ff02::1", Multicast),
            ("2001:db8::1", Documentation),
            ("3fff::1", Documentation),
            ("2001:0:4136:e378::1", Reserved),
            ("100::1", Reserved),
        ];
        for (text, class) in table {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(classify(ip), *class, "{text}");
        }
    }

    #[test]
    fn the_policy_allows_public_and_the_api_base_kind_only() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let public = AddressPolicy::public_only();
        assert!(public.allows(ip("8.8.8.8")));
        for refused in ["127.0.0.1", "10.0.0.1", "169.254.169.254", "::ffff:127.0.0.1", "fe80::1", "0.0.0.0"]
        {
            assert!(!public.allows(ip(refused)), "{refused}");
        }
        let local = AddressPolicy::allowing([Loopback, Public]);
        assert!(
            local.allows(ip("127.0.0.1")) && local.allows(ip("::1")) && local.allows(ip("::ffff:127.0.0.2"))
        );
        assert!(!local.allows(ip("10.0.0.1")) && !local.allows(ip("169.254.169.254")));
    }

    #[tokio::test]
    async fn the_api_base_decides_the_extra_class_without_any_lookup() {
        assert_eq!(
            AddressPolicy::for_api_base("http://127.0.0.1:8787").await,
            AddressPolicy::allowing([Loopback])
        );
        assert_eq!(
            AddressPolicy::for_api_base("http://[::1]:8787").await,
            AddressPolicy::allowing([Loopback])
        );
        assert_eq!(
            AddressPolicy::for_api_base("http://localhost:8787").await,
            AddressPolicy::allowing([Loopback])
        );
        assert_eq!(AddressPolicy::for_api_base("http://10.1.2.3").await, AddressPolicy::allowing([Private]));
        assert_eq!(AddressPolicy::for_api_base("https://8.8.8.8").await, AddressPolicy::public_only());
        assert_eq!(AddressPolicy::for_api_base("not a url").await, AddressPolicy::public_only());
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn redirects_stay_on_http_and_https_never_downgrade_and_stop_after_the_limit() {
        let any = AddressPolicy::allowing([Loopback]);
        let start = url("https://cdn.example/a.png");
        let first = std::slice::from_ref(&start);
        assert!(check_redirect(&url("https://other.example/b.png"), first, &any).is_ok());
        let err = check_redirect(&url("http://cdn.example/a.png"), first, &any).unwrap_err();
        assert!(err.to_string().contains("https to http"), "{err}");
        // Once https, never http again, even after an https hop.
        let chain = [url("http://a.example/"), start.clone()];
        assert!(check_redirect(&url("http://b.example/"), &chain, &any).is_err());
        // http to https is an upgrade.
        assert!(check_redirect(&start, &[url("http://cdn.example/a.png")], &any).is_ok());
        for scheme in ["ftp://cdn.example/a.png", "file:///etc/passwd", "data:image/png;base64,AAAA"] {
            let err = check_redirect(&url(scheme), first, &any).unwrap_err();
            assert!(err.to_string().contains("only http and https"), "{scheme}: {err}");
        }
        let hops: Vec<Url> = (0..=MAX_REDIRECTS).map(|i| url(&format!("https://h{i}.example/"))).collect();
        assert!(check_redirect(&url("https://next.example/"), &hops[..MAX_REDIRECTS], &any).is_ok());
        let err = check_redirect(&url("https://next.example/"), &hops, &any).unwrap_err();
        assert!(err.to_string().contains("more than 3 redirects"), "{err}");
    }

    #[test]
    fn redirects_and_urls_to_refused_addresses_are_refused() {
        let public = AddressPolicy::public_only();
        let start = [url("http://cdn.example/a.png")];
        for target in [
            "http://169.254.169.254/latest/meta-data/",
            "https://127.0.0.1:8080/x",
            "https://[::1]/x",
            "https://[::ffff:a9fe:a9fe]/x",
            "https://10.0.0.8/x",
            "https://[fd00::1]/x",
        ] {
            let err = check_redirect(&url(target), &start, &public).unwrap_err();
            assert!(err.to_string().contains("redirect refused"), "{target}: {err}");
            assert!(check_url(&url(target), &public).is_err(), "{target}");
        }
        assert!(check_url(&url("https://127.0.0.1/x"), &AddressPolicy::allowing([Loopback])).is_ok());
        assert!(check_url(&url("https://cdn.example/x"), &public).is_ok(), "names are checked once resolved");
    }

    #[tokio::test]
    async fn the_resolver_refuses_what_the_policy_refuses() {
        use reqwest::dns::Resolve as _;
        // An IP literal as the name: the system resolver answers without any network traffic.
        let name = |s: &str| s.parse::<reqwest::dns::Name>().unwrap();
        let strict = GuardedResolver { policy: AddressPolicy::public_only() };
        let err = match strict.resolve(name("127.0.0.1")).await {
            Ok(_) => panic!("loopback allowed under a public-only policy"),
            Err(e) => e,
        };
        assert!(err.to_string().contains("loopback address"), "{err}");
        let local = GuardedResolver { policy: AddressPolicy::allowing([Loopback]) };
        let addrs: Vec<SocketAddr> = local.resolve(name("127.0.0.1")).await.unwrap().collect();
        assert_eq!(addrs.len(), 1);
        assert!(addrs[0].ip().is_loopback());
    }
}
