//! What an idle MQTT connection costs at the least, in each of the two
//! models issue #11 item 4 asks to measure before choosing: a tokio task
//! per connection (what chatmq does), or shard loops that each own many
//! connections (what Mosquitto does). Not a broker: it answers CONNECT with
//! CONNACK and PINGREQ with PINGRESP, closes a connection silent past its
//! keepalive, and holds nothing else. `chatmq-load run idle --pid PID`
//! against it gives the floor of each model in bytes per connection; see
//! benches/README.md "Idle connections: the floor of each model".
//!
//!     chatmq-idle-floor --model task|shard --listen 127.0.0.1:0
//!
//! prints `listening ADDR` and serves until killed. Both models keep no
//! buffer while a connection is idle (a packet is read into a stack
//! buffer when bytes come) and one keepalive deadline per connection: the
//! task model as a `tokio::time::sleep` in the task, the shard model as a
//! number in the connection's slot, checked once a second.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What a client gets on CONNECT: accepted, no session present (3.1.1 and
/// 5 shapes).
const CONNACK_V4: [u8; 4] = [0x20, 0x02, 0x00, 0x00];
const CONNACK_V5: [u8; 5] = [0x20, 0x03, 0x00, 0x00, 0x00];
const PINGRESP: [u8; 2] = [0xD0, 0x00];
/// Keepalive when the CONNECT asks for none, and the grace on top of it.
const KEEPALIVE_SECS: u64 = 60;

/// The answer to the bytes a connection sent so far: CONNACK to a whole
/// CONNECT, PINGRESP to each PINGREQ; `Err` closes the connection.
fn answer(packet: &[u8], connected: &mut bool, out: &mut Vec<u8>) -> Result<u64> {
    match (packet.first(), *connected) {
        (Some(0x10), false) => {
            // Fixed header, "MQTT", level at 8 (one-byte remaining length).
            let level = packet.get(8).copied().unwrap_or(4);
            let keepalive = packet
                .get(10..12)
                .map_or(0, |b| u64::from(u16::from_be_bytes([b[0], b[1]])));
            out.extend_from_slice(if level == 5 {
                &CONNACK_V5[..]
            } else {
                &CONNACK_V4[..]
            });
            *connected = true;
            Ok(if keepalive == 0 {
                KEEPALIVE_SECS
            } else {
                keepalive.saturating_mul(3).div_ceil(2)
            })
        }
        (Some(0xC0), true) => {
            out.extend_from_slice(&PINGRESP);
            Ok(0)
        }
        _ => bail!("not a CONNECT then PINGREQs"),
    }
}

/// The task model: one tokio task per connection.
mod task {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    pub fn serve(listen: SocketAddr) -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let listener = TcpListener::bind(listen).await?;
            println!("listening {}", listener.local_addr()?);
            loop {
                let (stream, _) = listener.accept().await?;
                tokio::spawn(async move {
                    let _ = connection(stream).await;
                });
            }
        })
    }

    async fn connection(mut stream: TcpStream) -> Result<()> {
        let mut connected = false;
        let mut deadline = tokio::time::Instant::now() + Duration::from_secs(KEEPALIVE_SECS);
        loop {
            tokio::select! {
                r = stream.readable() => r?,
                _ = tokio::time::sleep_until(deadline) => return Ok(()),
            }
            let mut buf = [0u8; 256];
            let n = match stream.try_read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            let keepalive = answer(&buf[..n], &mut connected, &mut out)?;
            if keepalive > 0 || buf[0] == 0xC0 {
                let secs = if keepalive > 0 {
                    keepalive
                } else {
                    KEEPALIVE_SECS
                };
                deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
            }
            stream.write_all(&out).await?;
        }
    }
}

/// The shard model: one thread per core, each with its own epoll (mio)
/// and a slab of connections; the listener hands new sockets out in turn.
mod shard {
    use super::*;
    use mio::net::{TcpListener, TcpStream};
    use mio::{Events, Interest, Poll, Token, Waker};
    use std::sync::mpsc;

    const WAKER: Token = Token(usize::MAX);

    /// One connection's slot: its socket and when it goes silent past its
    /// keepalive (seconds since the shard started). Nothing else.
    struct Conn {
        stream: TcpStream,
        deadline: u32,
        connected: bool,
    }

    pub fn serve(listen: SocketAddr) -> Result<()> {
        let shards = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut handoff = Vec::new();
        for _ in 0..shards {
            let poll = Poll::new()?;
            let waker = Waker::new(poll.registry(), WAKER)?;
            let (tx, rx) = mpsc::channel::<TcpStream>();
            handoff.push((tx, waker));
            std::thread::spawn(move || {
                let _ = run(poll, rx);
            });
        }
        let std_listener = std::net::TcpListener::bind(listen)?;
        println!("listening {}", std_listener.local_addr()?);
        std_listener.set_nonblocking(false)?;
        let mut next = 0usize;
        for stream in std_listener.incoming() {
            let Ok(stream) = stream else { continue };
            stream.set_nonblocking(true)?;
            let (tx, waker) = &handoff[next % handoff.len()];
            next = next.wrapping_add(1);
            tx.send(TcpStream::from_std(stream)).context("shard gone")?;
            waker.wake()?;
        }
        Ok(())
    }

    fn run(mut poll: Poll, incoming: mpsc::Receiver<TcpStream>) -> Result<()> {
        let started = Instant::now();
        let now = |started: Instant| started.elapsed().as_secs() as u32;
        let mut slab: Vec<Option<Conn>> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        let mut events = Events::with_capacity(1024);
        let mut swept = 0u32;
        loop {
            poll.poll(&mut events, Some(Duration::from_secs(1)))?;
            for ev in events.iter() {
                if ev.token() == WAKER {
                    while let Ok(mut stream) = incoming.try_recv() {
                        let i = free.pop().unwrap_or_else(|| {
                            slab.push(None);
                            slab.len() - 1
                        });
                        poll.registry()
                            .register(&mut stream, Token(i), Interest::READABLE)?;
                        slab[i] = Some(Conn {
                            stream,
                            deadline: now(started).saturating_add(KEEPALIVE_SECS as u32),
                            connected: false,
                        });
                    }
                    continue;
                }
                let i = ev.token().0;
                let Some(Some(conn)) = slab.get_mut(i) else {
                    continue;
                };
                if serve_one(conn, now(started)).is_err() {
                    if let Some(mut gone) = slab[i].take() {
                        let _ = poll.registry().deregister(&mut gone.stream);
                    }
                    free.push(i);
                }
            }
            // The keepalive check: once a second, over every slot.
            let t = now(started);
            if t != swept {
                swept = t;
                for (i, slot) in slab.iter_mut().enumerate() {
                    if slot.as_ref().is_some_and(|c| c.deadline < t) {
                        if let Some(mut gone) = slot.take() {
                            let _ = poll.registry().deregister(&mut gone.stream);
                        }
                        free.push(i);
                    }
                }
            }
        }
    }

    fn serve_one(conn: &mut Conn, now: u32) -> Result<()> {
        loop {
            let mut buf = [0u8; 256];
            let n = match conn.stream.read(&mut buf) {
                Ok(0) => bail!("closed"),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            let keepalive = answer(&buf[..n], &mut conn.connected, &mut out)?;
            let secs = if keepalive > 0 {
                keepalive
            } else {
                KEEPALIVE_SECS
            };
            conn.deadline = now.saturating_add(secs as u32);
            conn.stream.write_all(&out)?;
        }
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let listen: SocketAddr = value("--listen")
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
        .context("--listen ADDR")?;
    match value("--model").as_deref() {
        Some("task") => task::serve(listen),
        Some("shard") => shard::serve(listen),
        _ => bail!("usage: chatmq-idle-floor --model task|shard [--listen ADDR]"),
    }
}
