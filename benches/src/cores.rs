//! Multi-core scaling (`compare --only cores`): the same throughput
//! scenarios (QoS 1 pairs, QoS 0 fan-in) against chatmq pinned to one
//! core and to two, the two brokers taking turns.
//!
//! How the load is pinned: with chatmq on CPU 0 alone, this process (the
//! load generator) runs on CPU 1 alone, so neither takes the other's core;
//! with chatmq on CPUs 0 and 1, the load runs on both too and everything
//! shares. On a 2-core machine the 2-core run therefore gives chatmq two
//! cores *minus what the load takes*: the CPU time of both processes is
//! recorded with each row so the ratio can be read against it.

use std::process::Command;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;

use crate::compare::{measure, Binaries, Broker, Kind, Plan};
use crate::scenarios::{Outcome, Params, Scenario};

const ONE_CORE: &str = "0";
const TWO_CORES: &str = "0,1";

pub async fn run(bins: &Binaries, plan: &Plan, bar: &ProgressBar) -> Result<Vec<Outcome>> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        bail!("the cores scenario needs 2 CPUs, this machine has {cpus}");
    }
    let kind = Kind::Chatmq { sync_always: true };
    let mut one = Broker::start_pinned(kind, bins, Some(ONE_CORE))?;
    let mut two = Broker::start_pinned(kind, bins, Some(TWO_CORES))?;
    let mut out = Vec::new();
    let cases = [(Scenario::Pairs, 1), (Scenario::Fanin, 0)];
    for (turn, &(scenario, qos)) in cases.iter().enumerate() {
        for pass in 0..2 {
            let single = (turn + pass) % 2 == 0;
            let (b, load_cpus, variant) = if single {
                (&mut one, "1", "1 core")
            } else {
                (&mut two, TWO_CORES, "2 cores")
            };
            let mut p = Params::new(scenario, b.addr);
            p.qos = qos;
            p.warmup = plan.warmup;
            p.duration = plan.duration;
            p.variant = Some(variant.into());
            bar.set_prefix(format!("{} q{qos} on chatmq, {variant}", scenario.name()));
            pin_self(load_cpus)?;
            let before = (cpu_seconds(b.pid()), cpu_seconds(std::process::id()));
            let measured = measure(b, bins, p, bar).await;
            let after = (cpu_seconds(b.pid()), cpu_seconds(std::process::id()));
            pin_self(TWO_CORES)?;
            let mut o = measured?;
            if let ((Ok(b0), Ok(l0)), (Ok(b1), Ok(l1))) = (before, after) {
                o.broker_cpu_s = Some(b1 - b0);
                o.load_cpu_s = Some(l1 - l0);
            }
            out.push(o);
        }
    }
    Ok(out)
}

/// Pins every thread of this process to `cpus` (`taskset -a -p -c`);
/// threads started later inherit it.
fn pin_self(cpus: &str) -> Result<()> {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running taskset (util-linux) to pin the load generator")?;
    if !status.success() {
        bail!("taskset -a -p -c {cpus} failed");
    }
    Ok(())
}

/// CPU time (user + system) a process has used, seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(f.get(i)
            .context("short /proc/PID/stat")?
            .parse::<f64>()
            .context("utime/stime")?)
    };
    // utime and stime: fields 14 and 15 of the line, 11 and 12 after the `)`.
    Ok((ticks(11)? + ticks(12)?) / clock_ticks())
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
