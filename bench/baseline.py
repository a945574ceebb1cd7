#!/usr/bin/env python3
"""Background swaps for a whole product catalog with Seedream v4.5 Edit, written the way the
Seedance guides show it ("Seedream v4.5 Edit API: Programmatic Image Editing" and "Seedream v4.5
API: Integrate AI Images into Your App"): loop over the catalog, submit each edit asynchronously,
poll for the result, download the image; 5 requests in parallel; exponential backoff on 429 and
5xx ("Always wrap API calls in try/except with retry logic for 429 and 500 responses").

This is the baseline backdrop is benchmarked against (see bench/README-section.md). It is kept
faithful to what a reader of those guides writes, not a port of backdrop: it keeps no state, so
running it again after a crash or Ctrl-C submits (and pays for) every row again.

Usage:
    SEEDANCE_API_KEY=... python baseline.py catalog.csv out/

Environment:
    SEEDANCE_API_KEY   the key (required)
    SEEDANCE_API_BASE  API base URL [https://api.seedance.it.com]
    POLL_INTERVAL      seconds between status polls [5, as the guides say]
    MAX_WORKERS        requests in parallel [5, as the guides say: "start at 5 parallel, tune up"]
    SYNC               1: call the edit synchronously and take the images from its answer, the
                       guides' first example (no request id, no polling) [0: async and poll]
"""

import csv
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import requests

API_BASE = os.environ.get("SEEDANCE_API_BASE", "https://api.seedance.it.com").rstrip("/")
API_KEY = os.environ["SEEDANCE_API_KEY"]
HEADERS = {
    "Authorization": f"Bearer {API_KEY}",
    "Content-Type": "application/json",
}
PROMPT_TEMPLATE = "Place the {color} {name} on marble"
MAX_WORKERS = int(os.environ.get("MAX_WORKERS", "5"))  # "Concurrent request limits (start at 5 parallel, tune up)"
POLL_INTERVAL = float(os.environ.get("POLL_INTERVAL", "5"))  # "Poll every 5-10 seconds"
SYNC = os.environ.get("SYNC", "0") == "1"
MAX_RETRIES = 5
RETRY_STATUSES = {429, 500, 502, 503, 504}


def request_with_retry(method, url, **kwargs):
    """One HTTP call, retried with exponential backoff (1, 2, 4, 8 s) on 429 and 5xx."""
    for attempt in range(MAX_RETRIES):
        try:
            response = requests.request(method, url, timeout=60, **kwargs)
        except requests.ConnectionError:
            response = None
        if response is not None and response.status_code not in RETRY_STATUSES:
            response.raise_for_status()
            return response
        if attempt < MAX_RETRIES - 1:
            time.sleep(2**attempt)
    raise RuntimeError(f"{method} {url}: max retries exceeded")


def edit_body(row, asynchronous):
    return {
        "prompt": PROMPT_TEMPLATE.format(name=row["name"], color=row["color"]),
        "image_urls": [row["image_url"]],
        "num_images": 1,
        "output_format": "png",
        "async": asynchronous,
    }


def submit_edit(row):
    """Submits one row's edit asynchronously; returns the request id."""
    response = request_with_retry(
        "POST", f"{API_BASE}/v1/seedream/v4.5/edit", headers=HEADERS, json=edit_body(row, True)
    )
    return response.json()["request_id"]


def edit_now(row):
    """Edits one row synchronously: the answer carries the images."""
    response = request_with_retry(
        "POST", f"{API_BASE}/v1/seedream/v4.5/edit", headers=HEADERS, json=edit_body(row, False)
    )
    return response.json()


def wait_for_result(request_id):
    """Polls the status endpoint until the request is completed (or failed)."""
    while True:
        time.sleep(POLL_INTERVAL)
        status = request_with_retry(
            "GET", f"{API_BASE}/v1/requests/{request_id}", headers=HEADERS
        ).json()
        if status["status"] == "completed":
            return status
        if status["status"] == "failed":
            raise RuntimeError(f"generation failed: {status.get('error')}")


def process_row(row, out_dir):
    """Submit, poll (or one synchronous call), download: one catalog row. Returns the files
    written."""
    if SYNC:
        result = edit_now(row)
    else:
        result = wait_for_result(submit_edit(row))
    paths = []
    # Output URLs are valid for 24 hours: download at once.
    for i, image in enumerate(result["images"]):
        data = request_with_retry("GET", image["url"]).content
        path = os.path.join(out_dir, f"{row['sku']}_{i}.png")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    catalog_path, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    with open(catalog_path, newline="") as f:
        rows = list(csv.DictReader(f))

    done = failed = 0
    with ThreadPoolExecutor(max_workers=MAX_WORKERS) as pool:
        futures = {pool.submit(process_row, row, out_dir): row["sku"] for row in rows}
        for future in as_completed(futures):
            sku = futures[future]
            try:
                future.result()
                done += 1
                print(f"{sku}: done", flush=True)
            except Exception as e:  # log the row and keep going with the others
                failed += 1
                print(f"{sku}: FAILED: {e}", file=sys.stderr, flush=True)
    print(f"{done} done, {failed} failed of {len(rows)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
