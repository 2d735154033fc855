//! The table printed at the end of a run, with each figure's ratio to
//! Mosquitto's in the same scenario when Mosquitto ran too.

use crate::scenarios::Outcome;

const BASELINE: &str = "mosquitto";

fn fmt_rate(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 1e6 => format!("{:.2}M", v / 1e6),
        Some(v) if v >= 1e4 => format!("{:.1}k", v / 1e3),
        Some(v) => format!("{v:.0}"),
        None => "-".into(),
    }
}

fn one(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.0}ms", us as f64 / 1e3)
    } else if us >= 1000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{us}us")
    }
}

fn fmt_us(v: Option<[u64; 3]>) -> String {
    match v {
        Some([a, b, c]) => format!("{}/{}/{}", one(a), one(b), one(c)),
        None => "-".into(),
    }
}

/// The figure a row is judged by, and whether more is better.
pub fn headline(o: &Outcome) -> Option<(f64, bool)> {
    if let Some(r) = &o.restart {
        return Some((r.served_ms, false));
    }
    if o.small_ack_loaded_us.is_some() {
        return o.throughput.map(|t| (t, true));
    }
    if let Some(b) = o.rss_per_connection_bytes {
        return Some((b, false));
    }
    if let Some(c) = o.connects_per_s {
        return Some((c, true));
    }
    if o.rate.is_some() {
        return o.latency_us.map(|l| (l[1] as f64, false));
    }
    o.throughput.map(|t| (t, true))
}

/// The key under which rows of different brokers compare.
pub fn key(o: &Outcome) -> String {
    let mut k = format!("{} q{}", o.scenario, o.qos);
    if o.rate.is_some() && o.scenario != "group" {
        k.push_str(" (rate)");
    }
    if let Some(v) = &o.variant {
        k.push_str(&format!(" [{v}]"));
    }
    k
}

fn ratio(o: &Outcome, all: &[Outcome]) -> String {
    let Some(base) = all
        .iter()
        .find(|b| b.broker == BASELINE && key(b) == key(o))
    else {
        return "-".into();
    };
    match (headline(o), headline(base)) {
        (Some((v, _)), Some((b, _))) if b > 0.0 => format!("{:.2}x", v / b),
        _ => "-".into(),
    }
}

/// One line per outcome; the headline column is throughput (msg/s at the
/// receivers), latency p99 at a fixed rate, connects/s, or bytes per idle
/// connection.
pub fn table(all: &[Outcome]) -> String {
    let mut rows = vec![[
        "scenario".to_string(),
        "broker".into(),
        "clients".into(),
        "headline".into(),
        "vs mosq".into(),
        "recv msg/s".into(),
        "sent".into(),
        "drops".into(),
        "dups".into(),
        "latency p50/p99/p99.9".into(),
        "ack p50/p99/p99.9".into(),
    ]];
    for o in all {
        let headline = if let Some(e) = &o.error {
            format!("error: {}", e.chars().take(60).collect::<String>())
        } else if let Some(r) = &o.restart {
            format!("served in {:.0} ms", r.served_ms)
        } else if let (Some(idle), Some(loaded)) = (o.small_ack_idle_us, o.small_ack_loaded_us) {
            format!(
                "{} deliv/s; small ack p99 {} -> {} ({:.1}x)",
                fmt_rate(o.throughput),
                one(idle[1]),
                one(loaded[1]),
                loaded[1] as f64 / idle[1].max(1) as f64
            )
        } else if let (Some(b), false) = (o.rss_per_connection_bytes, o.checkpoints.is_empty()) {
            format!("{} conns, {:.1} KiB/conn", o.received, b / 1024.0)
        } else if let Some(b) = o.rss_per_connection_bytes {
            format!("{:.1} KiB/conn", b / 1024.0)
        } else if let Some(c) = o.connects_per_s {
            format!(
                "{} conn/s{}",
                fmt_rate(Some(c)),
                if o.refused.is_some() {
                    " (refused)"
                } else {
                    ""
                }
            )
        } else if let Some(r) = o.rate {
            match o.latency_us {
                Some(l) => format!("p99 {} at {}/s", one(l[1]), fmt_rate(Some(r))),
                None => format!("no receipts at {}/s", fmt_rate(Some(r))),
            }
        } else {
            format!("{} msg/s", fmt_rate(o.throughput))
        };
        rows.push([
            key(o),
            o.broker.clone(),
            o.clients.to_string(),
            headline,
            ratio(o, all),
            fmt_rate(o.throughput),
            o.sent.to_string(),
            o.drops.to_string(),
            o.duplicates.to_string(),
            fmt_us(o.latency_us),
            fmt_us(o.ack_latency_us),
        ]);
    }
    let mut width = [0usize; 11];
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut s = String::new();
    for (i, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .zip(width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
        if i == 0 {
            s.push_str(&"-".repeat(width.iter().sum::<usize>() + 2 * (width.len() - 1)));
            s.push('\n');
        }
    }
    for o in all {
        if let Some(n) = &o.note {
            s.push_str(&format!("note: {} on {}: {n}\n", key(o), o.broker));
        }
    }
    s
}
