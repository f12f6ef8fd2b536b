//! Load generator for the GetStatus benchmark (integration/bench/api.sh): calls
//! GetStatus over the agent's Unix socket at a steady rate and prints latency
//! percentiles. Open loop: calls go out on schedule whether or not earlier ones have
//! answered, so a slow answer cannot hide the calls queued behind it. Each call is
//! timed from when it was sent; tokio's timer wheel has 1 ms ticks, so sends can
//! start up to a tick late, which is reported separately (`max_send_lag_us`).
//!
//!     status_load SOCKET [RATE_PER_SEC] [SECONDS]

use std::time::{Duration, Instant};

use update_agent::api::{client, pb};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let socket = args
        .next()
        .ok_or("usage: status_load SOCKET [RATE] [SECONDS]")?;
    let rate: u64 = args.next().map_or(Ok(1000), |s| s.parse())?;
    let secs: u64 = args.next().map_or(Ok(30), |s| s.parse())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let c = client::unix(std::path::Path::new(&socket)).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<(u64, u64), String>>();
        let every = Duration::from_nanos(1_000_000_000 / rate);
        let start = Instant::now();
        let total = rate * secs;
        for i in 0..total {
            let due = start + every * u32::try_from(i)?;
            tokio::time::sleep_until(due.into()).await;
            let mut c = c.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let sent = Instant::now();
                let lag = u64::try_from(sent.duration_since(due).as_micros()).unwrap_or(u64::MAX);
                let r = c.get_status(pb::GetStatusRequest {}).await;
                let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                let _ = tx.send(r.map(|_| (us, lag)).map_err(|e| e.to_string()));
            });
        }
        drop(tx);
        let mut lat = Vec::with_capacity(total as usize);
        let mut errors = 0u64;
        let mut max_lag = 0u64;
        while let Some(r) = rx.recv().await {
            match r {
                Ok((us, lag)) => {
                    lat.push(us);
                    max_lag = max_lag.max(lag);
                }
                Err(e) => {
                    if errors == 0 {
                        eprintln!("first error: {e}");
                    }
                    errors += 1;
                }
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        lat.sort_unstable();
        let pct = |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0);
        println!(
            "calls={} errors={errors} achieved_rps={:.0} p50_us={} p90_us={} p99_us={} p999_us={} max_us={} max_send_lag_us={max_lag}",
            lat.len(),
            lat.len() as f64 / elapsed,
            pct(0.50),
            pct(0.90),
            pct(0.99),
            pct(0.999),
            lat.last().copied().unwrap_or(0)
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
