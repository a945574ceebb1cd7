//! The planner benchmark's driver (run by `bench/plan.sh`, which measures time and peak RSS of
//! each step in its own process):
//!
//! ```text
//! plan_bench generate CATALOG.csv ROWS      # write a synthetic catalog (URL images)
//! plan_bench plan CATALOG.csv PROMPT STATE  # plan it into STATE as a new run, print the plan
//! plan_bench mark-done STATE                # pretend every job finished
//! ```

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use backdrop::domain::ProviderKind;
use backdrop::plan::PlanInput;
use backdrop::store::Store;

const COLORS: [&str; 6] = ["white", "black", "cobalt blue", "olive", "signal red", "natural oak"];
const MATERIALS: [&str; 5] = ["stoneware", "brushed brass", "canvas", "full-grain leather", "recycled glass"];
const CATEGORIES: [&str; 5] = ["Kitchen", "Lighting", "Bags", "Shoes", "Furniture"];

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["generate", path, rows] => generate(path, rows.parse()?),
        ["plan", catalog, prompt, state] => plan(catalog, prompt, state).await,
        ["mark-done", state] => mark_done(state).await,
        _ => Err("usage: plan_bench generate FILE ROWS | plan CATALOG PROMPT STATE | mark-done STATE".into()),
    }
}

fn generate(path: &str, rows: u64) -> Result<(), Box<dyn std::error::Error>> {
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    writeln!(out, "sku,name,category,color,material,image_url")?;
    for i in 0..rows {
        let k = usize::try_from(i % 30)?;
        writeln!(
            out,
            "SKU-{i:08},Product {i},{},{},{},https://cdn.example.com/products/{i:08}.png",
            CATEGORIES[k % 5],
            COLORS[k % 6],
            MATERIALS[k % 5]
        )?;
    }
    out.flush()?;
    Ok(())
}

async fn plan(catalog: &str, prompt: &str, state: &str) -> Result<(), Box<dyn std::error::Error>> {
    let template = backdrop::prompt::Template::load(std::path::Path::new(prompt))?;
    let settings = PlanInput::new(catalog, template, ProviderKind::Seedance);
    let store = Store::open(std::path::Path::new(state)).await?;
    let (run,): (i64,) = sqlx::query_as(
        "INSERT INTO runs (started_at, catalog, provider, model) VALUES (?, ?, 'seedance', '') RETURNING id",
    )
    .bind(backdrop::store::now_ms())
    .bind(catalog)
    .fetch_one(store.pool())
    .await?;
    let started = Instant::now();
    let plan = backdrop::plan::plan(&store, &settings, Some(run)).await?;
    let planned = started.elapsed();
    store.close().await;
    print!("{}", plan.render_text());
    println!(
        "planned in {:.2} s (closed in {:.2} s)",
        planned.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn mark_done(state: &str) -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::open(&PathBuf::from(state)).await?;
    let done = sqlx::query("UPDATE jobs SET state = 'done'").execute(store.pool()).await?;
    println!("{} jobs marked done", done.rows_affected());
    store.close().await;
    Ok(())
}
