//! `chatmq-load plot`: SVG charts of the JSON that `compare` writes, by
//! hand (a few rectangles, lines and labels need no plotting library):
//!
//! - `compare.svg`, from `latest.json`: every scenario's headline figure
//!   as a multiple of Mosquitto's, for each other broker, on a log scale,
//!   turned so that right is always better (throughput over Mosquitto's,
//!   Mosquitto's latency or memory over the broker's);
//! - `scale.svg`, from `scale.json`: broker RSS per connection, and what
//!   the rest of the machine lost per connection, against the number of
//!   open connections.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::report::{headline, key};
use crate::scenarios::Outcome;

const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
const FONT: &str = "font-family=\"sans-serif\" font-size=\"12\"";

fn load(path: &Path) -> Result<Vec<Outcome>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a compare result", path.display()))
}

/// Writes the charts whose inputs exist; the paths written.
pub fn write(compare: &Path, scale: &Path, out: &Path) -> Result<Vec<String>> {
    let mut written = Vec::new();
    if compare.exists() {
        let path = out.join("compare.svg");
        std::fs::write(&path, ratios(&load(compare)?))?;
        written.push(path.display().to_string());
    }
    if scale.exists() {
        let path = out.join("scale.svg");
        std::fs::write(&path, scale_chart(&load(scale)?))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

/// A growing SVG document.
struct Svg {
    body: String,
    width: f64,
    height: f64,
}

impl Svg {
    fn new(width: f64, height: f64) -> Svg {
        Svg {
            body: String::new(),
            width,
            height,
        }
    }

    fn text(&mut self, x: f64, y: f64, anchor: &str, s: &str) {
        let s = s.replace('&', "&amp;").replace('<', "&lt;");
        let _ = writeln!(
            self.body,
            r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" {FONT}>{s}</text>"#
        );
    }

    fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), style: &str) {
        let _ = writeln!(
            self.body,
            r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" {style}/>"#
        );
    }

    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str) {
        let _ = writeln!(
            self.body,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{fill}"/>"#
        );
    }

    fn polyline(&mut self, points: &[(f64, f64)], color: &str, dashed: bool) {
        let pts: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let dash = if dashed {
            r#" stroke-dasharray="6,4""#
        } else {
            ""
        };
        let _ = writeln!(
            self.body,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
            pts.join(" ")
        );
        for (x, y) in points {
            let _ = writeln!(
                self.body,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#
            );
        }
    }

    fn finish(self) -> String {
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{}</svg>\n",
            self.body,
            w = self.width,
            h = self.height
        )
    }
}

/// Each broker's headline over Mosquitto's in the same row, right = better.
fn ratios(all: &[Outcome]) -> String {
    let mut brokers: Vec<&str> = Vec::new();
    for o in all {
        if o.broker != "mosquitto" && !brokers.contains(&o.broker.as_str()) {
            brokers.push(&o.broker);
        }
    }
    // (row label, [(broker index, advantage)])
    let mut rows: Vec<(String, Vec<(usize, f64)>)> = Vec::new();
    for base in all
        .iter()
        .filter(|o| o.broker == "mosquitto" && o.error.is_none())
    {
        let Some((b, more_is_better)) = headline(base) else {
            continue;
        };
        let mut bars = Vec::new();
        for (i, name) in brokers.iter().enumerate() {
            let v = all
                .iter()
                .find(|o| o.broker == *name && key(o) == key(base) && o.error.is_none())
                .and_then(headline);
            if let Some((v, _)) = v {
                if v > 0.0 && b > 0.0 {
                    bars.push((i, if more_is_better { v / b } else { b / v }));
                }
            }
        }
        if !bars.is_empty() {
            rows.push((key(base), bars));
        }
    }
    let (lo, hi) = rows
        .iter()
        .flat_map(|(_, bars)| bars.iter().map(|b| b.1))
        .fold((1.0f64, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = (
        10f64.powf(lo.log10().floor()),
        10f64.powf(hi.log10().ceil()),
    );
    let (left, width, bar_h) = (170.0, 560.0, 12.0);
    let row_h = bar_h * brokers.len() as f64 + 10.0;
    let top = 50.0;
    let height = top + row_h * rows.len() as f64 + 40.0 + 18.0 * brokers.len() as f64;
    let mut svg = Svg::new(left + width + 60.0, height);
    let x_of = |v: f64| left + width * (v.log10() - lo.log10()) / (hi.log10() - lo.log10());
    svg.text(
        (left + width) / 2.0 + 30.0,
        20.0,
        "middle",
        "headline figure as a multiple of Mosquitto's (log scale; right is better)",
    );
    let bottom = top + row_h * rows.len() as f64;
    let mut tick = lo;
    while tick <= hi * 1.0001 {
        let x = x_of(tick);
        let style = if (tick - 1.0).abs() < 1e-9 {
            r##"stroke="#000" stroke-width="1.5""##
        } else {
            r##"stroke="#ccc""##
        };
        svg.line((x, top - 5.0), (x, bottom), style);
        svg.text(x, bottom + 15.0, "middle", &format!("{tick}x"));
        tick *= 10.0;
    }
    for (r, (label, bars)) in rows.iter().enumerate() {
        let y = top + row_h * r as f64;
        svg.text(left - 8.0, y + row_h / 2.0 + 4.0, "end", label);
        for (i, v) in bars {
            let by = y + 5.0 + bar_h * *i as f64;
            let (x1, x2) = (x_of(1.0), x_of(*v));
            svg.rect(
                x1.min(x2),
                by,
                (x2 - x1).abs().max(1.0),
                bar_h - 2.0,
                COLORS[i % COLORS.len()],
            );
            svg.text(
                x1.max(x2) + 4.0,
                by + bar_h - 3.0,
                "start",
                &format!("{v:.2}"),
            );
        }
    }
    for (i, name) in brokers.iter().enumerate() {
        let y = bottom + 35.0 + 18.0 * i as f64;
        svg.rect(left, y - 10.0, 12.0, 12.0, COLORS[i % COLORS.len()]);
        svg.text(left + 18.0, y, "start", name);
    }
    svg.finish()
}

/// RSS per connection against connections, per broker (solid), and the
/// rest of the machine's loss per connection (dashed).
fn scale_chart(all: &[Outcome]) -> String {
    let runs: Vec<&Outcome> = all.iter().filter(|o| !o.checkpoints.is_empty()).collect();
    let kib = 1024.0;
    let max_x = runs
        .iter()
        .flat_map(|o| o.checkpoints.iter().map(|c| c.connections as f64))
        .fold(1.0, f64::max);
    let max_y = runs
        .iter()
        .flat_map(|o| {
            o.checkpoints.iter().flat_map(|c| {
                [
                    c.rss_per_connection_bytes.unwrap_or(0.0),
                    c.other_per_connection_bytes,
                ]
            })
        })
        .fold(1.0, f64::max)
        / kib
        * 1.1;
    let (left, top, width, height) = (70.0, 40.0, 600.0, 320.0);
    let mut svg = Svg::new(
        left + width + 40.0,
        top + height + 60.0 + 18.0 * 2.0 * runs.len() as f64,
    );
    let x_of = |x: f64| left + width * x / max_x;
    let y_of = |y: f64| top + height * (1.0 - y / max_y);
    svg.text(
        left + width / 2.0,
        20.0,
        "middle",
        "memory per idle connection (KiB) against open connections",
    );
    for i in 0..=5 {
        let (fx, fy) = (max_x * i as f64 / 5.0, max_y * i as f64 / 5.0);
        svg.line(
            (x_of(fx), top),
            (x_of(fx), top + height),
            r##"stroke="#eee""##,
        );
        svg.line(
            (left, y_of(fy)),
            (left + width, y_of(fy)),
            r##"stroke="#eee""##,
        );
        svg.text(
            x_of(fx),
            top + height + 15.0,
            "middle",
            &format!("{:.0}k", fx / 1000.0),
        );
        svg.text(left - 6.0, y_of(fy) + 4.0, "end", &format!("{fy:.1}"));
    }
    svg.line(
        (left, top + height),
        (left + width, top + height),
        r##"stroke="#000""##,
    );
    svg.line((left, top), (left, top + height), r##"stroke="#000""##);
    let mut legend = top + height + 40.0;
    for (i, o) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let rss: Vec<(f64, f64)> = o
            .checkpoints
            .iter()
            .filter_map(|c| {
                Some((
                    x_of(c.connections as f64),
                    y_of(c.rss_per_connection_bytes? / kib),
                ))
            })
            .collect();
        let other: Vec<(f64, f64)> = o
            .checkpoints
            .iter()
            .map(|c| {
                (
                    x_of(c.connections as f64),
                    y_of(c.other_per_connection_bytes / kib),
                )
            })
            .collect();
        svg.polyline(&rss, color, false);
        svg.polyline(&other, color, true);
        svg.line(
            (left, legend - 4.0),
            (left + 24.0, legend - 4.0),
            &format!(r#"stroke="{color}" stroke-width="2""#),
        );
        svg.text(
            left + 30.0,
            legend,
            "start",
            &format!("{}: broker RSS per connection", o.broker),
        );
        legend += 18.0;
        svg.line(
            (left, legend - 4.0),
            (left + 24.0, legend - 4.0),
            &format!(r#"stroke="{color}" stroke-width="2" stroke-dasharray="6,4""#),
        );
        svg.text(
            left + 30.0,
            legend,
            "start",
            &format!(
                "{}: rest of the machine (kernel sockets, ...) per connection",
                o.broker
            ),
        );
        legend += 18.0;
    }
    svg.finish()
}
