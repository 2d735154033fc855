//! `chatmq-load`: the load generator and broker comparison of chatmq.
//! See benches/README.md for the scenarios, the options and the figures.

mod client;
mod compare;
mod cores;
mod group;
mod plot;
mod probe;
mod report;
mod restart;
mod scale;
mod scenarios;
mod stats;
mod transport;
mod wire;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use client::ClientKind;
use scenarios::{Params, Scenario};
use transport::Transport;

const USAGE: &str = "usage:
  chatmq-load run SCENARIO --addr HOST:PORT [options]
      SCENARIO: pairs | fanin | fanout | chat | storm | idle | group | scale
      --qos 0|1            (default: pairs/fanin/chat 1, fanout 0)
      --clients N          pairs, publishers (fanin), subscribers (fanout),
                           connections (storm cap, idle, scale target)
      --groups K --group-size G    chat (default 10 x 5); group: its size (needs --jwt-secret)
      --step N --min-free-mb M     scale: checkpoint every N connections (50000),
                           stop when the machine has under M MiB available (2048)
      --size BYTES         payload size (default 64)
      --warmup S --duration S      (default 0.5 and 3)
      --rate MSG_PER_S     open loop at a fixed total rate (latency); default closed loop
      --inflight N         QoS 1 window per publisher (default 100)
      --client raw|rumqttc (default raw)
      --jwt-secret S       chatmq: members log in with HS256 JWTs and groups are created by RPC
      --pid PID            the broker's process (idle, scale: RSS per connection)
      --transport tcp|tls|ws  idle: how connections reach --addr (default tcp);
                           tls trusts --ca PEM (server name localhost), ws dials ws://ADDR/mqtt
      --more-addrs A,B     chat and the plain scenarios: the other nodes of a cluster;
                           client i connects to --addr and these in turn
      --label NAME         the broker's name in the report
      --json FILE          also write the outcome as JSON
  chatmq-load compare --chatmq-bin PATH [--mosquitto-bin PATH] [--rumqttd-bin PATH]
      [--warmup S] [--duration S] [--storm-max N] [--idle-connections N]
      [--group-sizes 1000,10000] [--clients N (scale target)] [--step N] [--min-free-mb M]
      [--restart-messages N] [--restart-sessions N]
      [--only pairs,fanin,fanout,chat,groups,latency,storm,cores,idle,restart,scale]
      [--json FILE]     (restart and scale run only when --only names them)
  chatmq-load plot [--compare FILE] [--scale FILE] [--out DIR]
      SVG charts (compare.svg, scale.svg) from compare's JSON
      (defaults: benches/results/latest.json, benches/results/scale.json, benches/results)
  benches/compare.sh installs and builds what compare needs, then runs it.";

struct Args {
    words: Vec<String>,
    opts: HashMap<String, String>,
}

impl Args {
    fn parse(raw: impl Iterator<Item = String>) -> Result<Args> {
        let mut words = Vec::new();
        let mut opts = HashMap::new();
        let mut it = raw.peekable();
        while let Some(a) = it.next() {
            if let Some(k) = a.strip_prefix("--") {
                if let Some((k, v)) = k.split_once('=') {
                    opts.insert(k.to_string(), v.to_string());
                } else {
                    let v = it.next().ok_or_else(|| anyhow!("--{k} needs a value"))?;
                    opts.insert(k.to_string(), v);
                }
            } else {
                words.push(a);
            }
        }
        Ok(Args { words, opts })
    }

    fn get<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        match self.opts.remove(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|e| anyhow!("--{key} {v}: {e}")),
        }
    }

    fn secs(&mut self, key: &str) -> Result<Option<Duration>> {
        Ok(self.get::<f64>(key)?.map(Duration::from_secs_f64))
    }

    fn done(&self) -> Result<()> {
        match self.opts.keys().next() {
            Some(k) => bail!("unknown option --{k}"),
            None => Ok(()),
        }
    }
}

fn write_json(path: Option<String>, value: &impl serde::Serialize) -> Result<()> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(value)?;
        std::fs::write(&path, text + "\n").with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}

async fn run_one(mut a: Args) -> Result<()> {
    let scenario = Scenario::parse(
        a.words
            .get(1)
            .ok_or_else(|| anyhow!("run needs a scenario"))?,
    )?;
    let addr = a
        .get::<String>("addr")?
        .ok_or_else(|| anyhow!("--addr HOST:PORT is required"))?;
    let addr = tokio::net::lookup_host(&addr)
        .await?
        .next()
        .ok_or_else(|| anyhow!("--addr {addr}: no address"))?;
    let mut p = Params::new(scenario, addr);
    if let Some(more) = a.get::<String>("more-addrs")? {
        for one in more.split(',').filter(|s| !s.is_empty()) {
            let resolved = tokio::net::lookup_host(one)
                .await?
                .next()
                .ok_or_else(|| anyhow!("--more-addrs {one}: no address"))?;
            p.more_addrs.push(resolved);
        }
    }
    if let Some(q) = a.get::<u8>("qos")? {
        if q > 1 {
            bail!("--qos is 0 or 1");
        }
        p.qos = q;
    }
    if let Some(v) = a.get("clients")? {
        p.clients = v;
    }
    if let Some(v) = a.get("groups")? {
        p.groups = v;
    }
    if let Some(v) = a.get("group-size")? {
        p.group_size = v;
    }
    if let Some(v) = a.get("size")? {
        p.payload_size = v;
    }
    if let Some(v) = a.secs("warmup")? {
        p.warmup = v;
    }
    if let Some(v) = a.secs("duration")? {
        p.duration = v;
    }
    p.rate = a.get("rate")?;
    if let Some(v) = a.get("inflight")? {
        p.inflight = v;
    }
    p.client = match a.get::<String>("client")?.as_deref() {
        None | Some("raw") => ClientKind::Raw,
        Some("rumqttc") => ClientKind::Rumqttc,
        Some(o) => bail!("--client {o}: raw or rumqttc"),
    };
    p.jwt_secret = a.get("jwt-secret")?;
    p.pid = a.get("pid")?;
    p.transport = match a.get::<String>("transport")?.as_deref() {
        None | Some("tcp") => Transport::Tcp,
        Some("tls") => {
            let ca = a
                .get::<PathBuf>("ca")?
                .ok_or_else(|| anyhow!("--transport tls needs --ca PEM (the broker's CA)"))?;
            Transport::Tls(transport::client_config(&ca)?)
        }
        Some("ws") => Transport::WebSocket,
        Some(o) => bail!("--transport {o}: tcp, tls or ws"),
    };
    p.variant = p.transport.variant().map(str::to_string);
    if let Some(v) = a.get("step")? {
        p.scale.step = v;
    }
    if let Some(v) = a.get::<u64>("min-free-mb")? {
        p.scale.min_free_bytes = v << 20;
    }
    let label = a
        .get::<String>("label")?
        .unwrap_or_else(|| addr.to_string());
    let json = a.get::<String>("json")?;
    a.done()?;

    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let outcome = scenarios::run(&p, &label, &bar).await;
    bar.finish_and_clear();
    print!("{}", report::table(std::slice::from_ref(&outcome)));
    write_json(json, &outcome)?;
    if let Some(e) = &outcome.error {
        bail!("{e}");
    }
    Ok(())
}

async fn run_compare(mut a: Args) -> Result<()> {
    let bins = compare::Binaries {
        chatmq: a
            .get::<PathBuf>("chatmq-bin")?
            .ok_or_else(|| anyhow!("--chatmq-bin PATH is required"))?,
        mosquitto: a
            .get("mosquitto-bin")?
            .unwrap_or_else(|| PathBuf::from("/usr/sbin/mosquitto")),
        rumqttd: a.get("rumqttd-bin")?,
    };
    let mut scale = scale::Limits::default();
    if let Some(v) = a.get("step")? {
        scale.step = v;
    }
    if let Some(v) = a.get::<u64>("min-free-mb")? {
        scale.min_free_bytes = v << 20;
    }
    let fill = restart::Fill::default();
    let plan = compare::Plan {
        warmup: a.secs("warmup")?.unwrap_or(Duration::from_millis(500)),
        duration: a.secs("duration")?.unwrap_or(Duration::from_secs(3)),
        storm_max: a.get("storm-max")?.unwrap_or(10_000),
        idle_connections: a.get("idle-connections")?.unwrap_or(2_000),
        group_sizes: match a.get::<String>("group-sizes")? {
            None => vec![1_000, 10_000],
            Some(list) => list
                .split(',')
                .map(|n| {
                    n.trim()
                        .parse()
                        .map_err(|e| anyhow!("--group-sizes {n}: {e}"))
                })
                .collect::<Result<_>>()?,
        },
        scale_clients: a.get("clients")?.unwrap_or(1_000_000),
        scale,
        restart: restart::Fill {
            messages: a.get("restart-messages")?.unwrap_or(fill.messages),
            sessions: a.get("restart-sessions")?.unwrap_or(fill.sessions),
        },
        only: a
            .get::<String>("only")?
            .map(|s| s.split(',').map(str::to_string).collect())
            .unwrap_or_default(),
    };
    let json = a.get::<String>("json")?;
    a.done()?;
    // The brokers run in their own directories: relative paths must not break.
    let absolute =
        |p: PathBuf| std::fs::canonicalize(&p).with_context(|| format!("{}", p.display()));
    let bins = compare::Binaries {
        chatmq: absolute(bins.chatmq)?,
        mosquitto: absolute(bins.mosquitto)?,
        rumqttd: bins.rumqttd.map(absolute).transpose()?,
    };
    let started = std::time::Instant::now();
    let outcomes = compare::run(&bins, &plan).await?;
    println!("{}", report::table(&outcomes));
    println!("{}", compare::targets(&outcomes));
    println!("compare took {:.0} s", started.elapsed().as_secs_f64());
    write_json(json, &outcomes)?;
    Ok(())
}

fn run_plot(mut a: Args) -> Result<()> {
    let results = PathBuf::from("benches/results");
    let compare = a
        .get::<PathBuf>("compare")?
        .unwrap_or_else(|| results.join("latest.json"));
    let scale = a
        .get::<PathBuf>("scale")?
        .unwrap_or_else(|| results.join("scale.json"));
    let out = a.get::<PathBuf>("out")?.unwrap_or(results);
    a.done()?;
    let written = plot::write(&compare, &scale, &out)?;
    if written.is_empty() {
        bail!(
            "nothing to plot: neither {} nor {} exists",
            compare.display(),
            scale.display()
        );
    }
    for w in written {
        println!("wrote {w}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chatmq-load: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chatmq-load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match args.words.first().map(String::as_str) {
            Some("run") => run_one(args).await,
            Some("compare") => run_compare(args).await,
            Some("plot") => run_plot(args),
            Some("help") | None => {
                println!("{USAGE}");
                Ok(())
            }
            Some(other) => Err(anyhow!("unknown command `{other}`\n{USAGE}")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatmq-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}
