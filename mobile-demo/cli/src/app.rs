//! The client's behaviour: what a typed line does, what each packet from
//! the broker does, and when the state file is written.
//!
//! The story of a send: the line becomes an outbox entry with a new
//! envelope id, the state file is written, then the entry is published at
//! QoS 1 if connected (at most `WINDOW` at a time). It leaves the outbox
//! when the broker acknowledges it: its PUBACK, or the delivery of our own
//! message back to us on `chat/+`, whichever comes first. The `acked`
//! event waits for that delivery, which carries the seq (the PUBACK comes
//! first in practice and has none). After a reconnect every entry left is
//! published again with the same id; the broker answers a repeat with the
//! seq it already gave.
//!
//! The story of a delivery: the timeline decides whether it is shown
//! (dedup by (conv, seq), in order), the state file records the new last
//! seq, and only then is the PUBLISH acknowledged (manual acks), so a crash
//! in between means a redelivery, not a loss.
//!
//! The story of a resume: after CONNACK, a session the broker still had
//! replays by itself; a session it lost gets the subscriptions again and
//! every known conversation is filled from `rpc/history` after its last
//! seq.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PubAckReason, Publish, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, MqttOptions};
use rumqttc::TlsConfiguration;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::args::{Options, Transport};
use crate::command::{self, Command};
use crate::link::{self, NetEvent};
use crate::output::Printer;
use crate::state::{Pending, State};
use crate::timeline::{Message, Step, Timeline};

/// Sends in flight on one connection at most; the rest wait in the outbox.
const WINDOW: usize = 32;
/// Messages per history page when filling a gap.
const FILL_PAGE: u64 = 100;
/// The session the client asks for (the broker caps it at its
/// `mqtt.session_expiry_max`): a phone may stay away for days.
const SESSION_EXPIRY_SECS: u32 = u32::MAX;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Sends acknowledged by PUBACK whose seq is still to come, at most.
const AWAITING_SEQ: usize = 1024;
/// How long `/quit` waits for its DISCONNECT to go out.
const GOODBYE: Duration = Duration::from_secs(1);

/// Whether to keep reading commands.
#[derive(Debug, PartialEq)]
enum Flow {
    Continue,
    Quit,
}

/// What an RPC we sent was for.
enum Rpc {
    Conversations,
    History { conv: String },
    Fill { conv: String },
    Read,
}

/// The connection currently up.
struct Link {
    conn: u64,
    client: AsyncClient,
    /// Publishes asked for whose packet id is not known yet, in order:
    /// the envelope id of a chat send, `None` for an RPC.
    unnumbered: VecDeque<Option<String>>,
    /// Chat sends awaiting PUBACK, by packet id.
    by_pkid: HashMap<u16, String>,
    /// Envelope ids published on this connection and still in the outbox.
    in_flight: HashSet<String>,
}

pub struct App {
    opts: Options,
    /// What TLS trusts, for mqtts:// and wss://.
    tls: TlsConfiguration,
    state: State,
    /// The state as last written, to skip writes that change nothing.
    saved: State,
    timeline: Timeline,
    out: Printer,
    link: Option<Link>,
    current: Option<String>,
    /// Sends the broker has stored (PUBACK) whose delivery back to us, with
    /// the seq, has not come yet: envelope id -> conversation, oldest first.
    awaiting_seq: VecDeque<(String, String)>,
    rpcs: HashMap<String, Rpc>,
    /// Correlation ids are `{rpc_prefix}-{n}`: fresh per run, so a reply
    /// queued for the session by an earlier run is not taken for ours.
    rpc_prefix: String,
    next_rpc: u64,
}

/// Runs the client until `/quit`, end of input or Ctrl-C.
pub async fn run(opts: Options) -> Result<()> {
    let state = State::open(&opts.state, &opts.user, opts.client_id.as_deref())?;
    // Written at once, so the client id is stable from the first run on.
    state.save(&opts.state)?;
    let tls = tls_config(&opts)?;
    let mut app = App::new(opts, state, tls);
    let (tx, mut net) = mpsc::channel(link::REQUESTS);
    let connection = link::spawn(app.mqtt_options(), tx);
    let mut lines = stdin_lines();
    loop {
        let flow = tokio::select! {
            line = lines.recv() => match line {
                Some(line) => app.command(&line)?,
                None => Flow::Quit,
            },
            event = net.recv() => match event {
                Some(event) => { app.network(event)?; Flow::Continue }
                None => bail!("the connection task stopped"),
            },
            _ = tokio::signal::ctrl_c() => Flow::Quit,
        };
        if flow == Flow::Quit {
            break;
        }
    }
    app.leave(&mut net).await;
    connection.abort();
    Ok(())
}

/// The system's CA bundle on Debian and its kin: what TLS trusts when no
/// `--ca` is given.
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The certificates TLS trusts: `--ca`, else the system bundle. Read only
/// when the transport uses TLS, so a plain client needs no file.
fn tls_config(opts: &Options) -> Result<TlsConfiguration> {
    let ca = match (&opts.transport, &opts.ca) {
        (Transport::Tcp | Transport::Ws(_), _) => Vec::new(),
        (_, Some(path)) => std::fs::read(path)
            .with_context(|| format!("--ca {}: cannot read it", path.display()))?,
        (_, None) => std::fs::read(SYSTEM_CAS)
            .with_context(|| format!("no --ca given and {SYSTEM_CAS} cannot be read"))?,
    };
    Ok(TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth: None,
    })
}

/// Lines typed on stdin, read on a thread of their own (a blocking read
/// has no place on the runtime); the channel closes at end of input.
fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl App {
    fn new(opts: Options, state: State, tls: TlsConfiguration) -> App {
        App {
            tls,
            out: Printer::new(opts.json),
            opts,
            saved: state.clone(),
            state,
            timeline: Timeline::default(),
            link: None,
            current: None,
            awaiting_seq: VecDeque::new(),
            rpcs: HashMap::new(),
            rpc_prefix: format!("r{:08x}", fastrand::u32(..)),
            next_rpc: 1,
        }
    }

    fn mqtt_options(&self) -> MqttOptions {
        let broker = match &self.opts.transport {
            Transport::Ws(url) | Transport::Wss(url) => url.as_str(),
            Transport::Tcp | Transport::Tls => self.opts.host.as_str(),
        };
        let mut o = MqttOptions::new(&self.state.client_id, broker, self.opts.port);
        o.set_transport(match &self.opts.transport {
            Transport::Tcp => rumqttc::Transport::Tcp,
            Transport::Tls => rumqttc::Transport::tls_with_config(self.tls.clone()),
            Transport::Ws(_) => rumqttc::Transport::Ws,
            Transport::Wss(_) => rumqttc::Transport::wss_with_config(self.tls.clone()),
        });
        o.set_credentials(&self.opts.user, &self.opts.password);
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(SESSION_EXPIRY_SECS));
        o.set_keep_alive(KEEP_ALIVE);
        o.set_manual_acks(true);
        o.set_max_packet_size(Some(1 << 20));
        o
    }

    fn events_topic(&self) -> String {
        format!("users/{}/events", self.opts.user)
    }

    /// Writes the state file if the state changed since the last write.
    fn save(&mut self) -> Result<()> {
        if self.state != self.saved {
            self.state.save(&self.opts.state)?;
            self.saved = self.state.clone();
        }
        Ok(())
    }

    // ---- what the user types

    fn command(&mut self, line: &str) -> Result<Flow> {
        let cmd = match command::parse(line, &self.opts.user) {
            Ok(cmd) => cmd,
            Err(e) => {
                self.out.error(&e);
                return Ok(Flow::Continue);
            }
        };
        match cmd {
            Command::Nothing => {}
            Command::Quit => return Ok(Flow::Quit),
            Command::Help => self.out.help(),
            Command::Open(conv) => {
                let last = self.state.last_seq.get(&conv).copied();
                self.out.opened(&conv, last);
                if let Some(seq) = last {
                    // What is shown here counts as read for the unread counts.
                    self.rpc("read", json!({"conv": conv, "seq": seq}), Rpc::Read);
                }
                self.current = Some(conv);
            }
            Command::Convs => {
                self.rpc("conversations", json!({}), Rpc::Conversations);
            }
            Command::History(n) => match self.current.clone() {
                Some(conv) => {
                    let params = json!({"conv": conv, "limit": n});
                    self.rpc("history", params, Rpc::History { conv });
                }
                None => self
                    .out
                    .error("no conversation open: /open CONV or /dm USER first"),
            },
            Command::Send(text) => match self.current.clone() {
                Some(conv) => self.send(conv, Value::String(text))?,
                None => self
                    .out
                    .error("no conversation open: /open CONV or /dm USER first"),
            },
        }
        Ok(Flow::Continue)
    }

    /// Persists the send in the outbox first, then publishes if it can.
    fn send(&mut self, conv: String, body: Value) -> Result<()> {
        let id = self.state.new_envelope_id();
        self.state.outbox.push(Pending {
            id: id.clone(),
            conv: conv.clone(),
            body,
        });
        self.save()?;
        self.out.sent(&id, &conv, self.link.is_some());
        self.pump();
        Ok(())
    }

    /// Publishes outbox entries not yet sent on this connection, oldest
    /// first, while the window has room.
    fn pump(&mut self) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        for p in &self.state.outbox {
            if link.in_flight.len() >= WINDOW {
                break;
            }
            if link.in_flight.contains(&p.id) {
                continue;
            }
            let envelope = json!({"id": p.id, "body": p.body, "type": "text"});
            let topic = format!("chat/{}", p.conv);
            if link
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, envelope.to_string())
                .is_err()
            {
                // The connection is going away; the next one sends it.
                break;
            }
            link.in_flight.insert(p.id.clone());
            link.unnumbered.push_back(Some(p.id.clone()));
        }
    }

    /// Sends an RPC request; its reply comes on our events topic.
    fn rpc(&mut self, method: &str, mut params: Value, what: Rpc) {
        let Some(link) = self.link.as_mut() else {
            if !matches!(what, Rpc::Read) {
                self.out
                    .error(&format!("offline: /{method} needs the broker"));
            }
            return;
        };
        let id = format!("{}-{}", self.rpc_prefix, self.next_rpc);
        self.next_rpc += 1;
        params["id"] = json!(id);
        let topic = format!("rpc/{method}");
        if link
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, params.to_string())
            .is_ok()
        {
            link.unnumbered.push_back(None);
            self.rpcs.insert(id, what);
        }
    }

    // ---- what the broker says

    fn network(&mut self, event: NetEvent) -> Result<()> {
        match event {
            NetEvent::Connected {
                conn,
                client,
                session_present,
            } => self.connected(conn, client, session_present),
            NetEvent::Lost {
                conn,
                error,
                retry_in,
            } => {
                if self.link.as_ref().is_none_or(|l| l.conn == conn) {
                    self.link = None;
                    self.rpcs.clear();
                }
                self.out.disconnected(&error, retry_in);
                Ok(())
            }
            NetEvent::Refused { error } => bail!(error),
            NetEvent::Closed => Ok(()),
            NetEvent::Published { conn, pkid } => {
                if let Some(link) = self.link.as_mut().filter(|l| l.conn == conn) {
                    if let Some(Some(id)) = link.unnumbered.pop_front() {
                        link.by_pkid.insert(pkid, id);
                    }
                }
                Ok(())
            }
            NetEvent::Incoming { conn, packet } => {
                if self.link.as_ref().is_some_and(|l| l.conn == conn) {
                    self.incoming(*packet)?;
                }
                Ok(())
            }
        }
    }

    fn connected(&mut self, conn: u64, client: AsyncClient, session_present: bool) -> Result<()> {
        self.link = Some(Link {
            conn,
            client,
            unnumbered: VecDeque::new(),
            by_pkid: HashMap::new(),
            in_flight: HashSet::new(),
        });
        self.rpcs.clear();
        self.out.connected(&self.state.client_id, session_present);
        if !session_present {
            self.state.subscribed = false;
            self.save()?;
        }
        if !self.state.subscribed {
            // A new session, or one the broker lost: subscribe (the broker
            // starts its cursors at each conversation's head; what came
            // before is fetched below).
            let filters = [
                Filter::new("chat/+", QoS::AtLeastOnce),
                Filter::new(self.events_topic(), QoS::AtLeastOnce),
            ];
            let subscribed = self
                .link
                .as_ref()
                .is_some_and(|l| l.client.try_subscribe_many(filters).is_ok());
            if !subscribed {
                return Ok(());
            }
        }
        // A lost session misses every conversation; a kept one only what
        // an earlier connection asked for and did not get.
        let mut convs = self.timeline.wanted();
        if !session_present {
            convs.extend(self.state.last_seq.keys().cloned());
            convs.sort();
            convs.dedup();
        }
        for conv in convs {
            if let Some(fetch) = self.timeline.fill(&self.state.last_seq, &conv) {
                self.fetch(fetch);
            }
        }
        self.pump();
        Ok(())
    }

    fn incoming(&mut self, packet: Packet) -> Result<()> {
        match packet {
            Packet::Publish(p) => {
                self.publish(&p)?;
                if let Some(link) = &self.link {
                    // On failure the broker redelivers after a reconnect,
                    // and the timeline drops the repeat.
                    let _ = link.client.try_ack(&p);
                }
            }
            Packet::PubAck(ack) => {
                let id = self.link.as_mut().and_then(|l| l.by_pkid.remove(&ack.pkid));
                if let Some(id) = id {
                    match ack.reason {
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                            self.stored(&id)?
                        }
                        reason => self.rejected(&id, reason)?,
                    }
                }
            }
            Packet::SubAck(ack) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| !matches!(c, SubscribeReasonCode::Success(_)));
                if refused {
                    self.out.error(&format!(
                        "the broker refused a subscription: {:?}",
                        ack.return_codes
                    ));
                } else {
                    self.state.subscribed = true;
                    self.save()?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A PUBLISH from the broker, before it is acknowledged.
    fn publish(&mut self, p: &Publish) -> Result<()> {
        let topic = String::from_utf8_lossy(&p.topic);
        if topic.starts_with("chat/") {
            match serde_json::from_slice::<Message>(&p.payload) {
                Ok(m) => {
                    let step = self.receive(m);
                    self.apply(step)?;
                }
                Err(e) => self
                    .out
                    .error(&format!("unreadable message on {topic}: {e}")),
            }
        } else if topic == self.events_topic() {
            match serde_json::from_slice::<Value>(&p.payload) {
                Ok(event) => self.event(event)?,
                Err(e) => self.out.error(&format!("unreadable event: {e}")),
            }
        }
        Ok(())
    }

    /// A delivered message: our own comes back as the proof of its send.
    fn receive(&mut self, m: Message) -> Step {
        self.echo(&m);
        self.timeline.live(&mut self.state.last_seq, m)
    }

    /// Our own message delivered back: the send it proves is stored, and
    /// this is its seq.
    fn echo(&mut self, m: &Message) {
        if m.from != self.opts.user {
            return;
        }
        let pending = self.forget(&m.id).is_some();
        let awaited = match self.awaiting_seq.iter().position(|(id, _)| *id == m.id) {
            Some(i) => self.awaiting_seq.remove(i).is_some(),
            None => false,
        };
        if pending || awaited {
            self.out.acked(&m.id, &m.conv, Some(m.seq));
            self.pump();
        }
    }

    /// Shows what the timeline released, asks for what it lacks, and
    /// writes the state (a delivery may have moved a last seq or emptied
    /// an outbox entry).
    fn apply(&mut self, step: Step) -> Result<()> {
        for m in &step.show {
            self.out.message(m);
        }
        self.save()?;
        if let Some(fetch) = step.fetch {
            self.fetch(fetch);
        }
        Ok(())
    }

    fn fetch(&mut self, (conv, after): (String, u64)) {
        let params = json!({"conv": conv, "after": after, "limit": FILL_PAGE});
        self.rpc("history", params, Rpc::Fill { conv });
    }

    /// Removes a send from the outbox and from this connection's window.
    fn forget(&mut self, id: &str) -> Option<Pending> {
        if let Some(link) = self.link.as_mut() {
            link.in_flight.remove(id);
        }
        self.state.take_pending(id)
    }

    /// A PUBACK: the send is on disk and leaves the outbox; its `acked`
    /// event waits for the seq (see `echo`).
    fn stored(&mut self, id: &str) -> Result<()> {
        if let Some(p) = self.forget(id) {
            self.save()?;
            if self.awaiting_seq.len() >= AWAITING_SEQ {
                if let Some((id, conv)) = self.awaiting_seq.pop_front() {
                    self.out.acked(&id, &conv, None);
                }
            }
            self.awaiting_seq.push_back((p.id, p.conv));
            self.pump();
        }
        Ok(())
    }

    /// The broker refused a send (MQTT 5 reason code): sending it again
    /// would be refused again, so it leaves the outbox.
    fn rejected(&mut self, id: &str, reason: PubAckReason) -> Result<()> {
        if let Some(p) = self.forget(id) {
            self.save()?;
            let why = match reason {
                PubAckReason::NotAuthorized => "not a member of this conversation".to_string(),
                PubAckReason::PayloadFormatInvalid => {
                    "the broker found the envelope invalid".into()
                }
                PubAckReason::QuotaExceeded => "rate limited or too large".into(),
                other => format!("{other:?}"),
            };
            self.out.rejected(&p.id, &p.conv, &why);
            self.pump();
        }
        Ok(())
    }

    /// An event on `users/{me}/events`: a reply to one of our RPCs, or
    /// news (membership, read receipts, errors) shown as a notice.
    fn event(&mut self, event: Value) -> Result<()> {
        let ours = (event["type"] == "rpc")
            .then(|| event["id"].as_str())
            .flatten()
            .and_then(|id| self.rpcs.remove(id));
        let Some(what) = ours else {
            if event["type"] != "rpc" {
                self.out.notice(&event);
            }
            return Ok(());
        };
        if event["ok"] != true {
            if let Rpc::Fill { conv } = &what {
                self.timeline.abandon(conv);
            }
            let error = &event["error"];
            self.out.error(&format!(
                "{}: {}",
                error["code"].as_str().unwrap_or("error"),
                error["message"].as_str().unwrap_or("the request failed")
            ));
            return Ok(());
        }
        let result = &event["result"];
        match what {
            Rpc::Read => {}
            Rpc::Conversations => self.out.conversations(result, self.current.as_deref()),
            Rpc::History { conv } => self.out.history(&conv, &messages_of(result)),
            Rpc::Fill { conv } => {
                let messages = messages_of(result);
                for m in &messages {
                    self.echo(m);
                }
                let head = result["head"].as_u64().unwrap_or(0);
                let step = self
                    .timeline
                    .page(&mut self.state.last_seq, &conv, messages, head);
                self.apply(step)?;
            }
        }
        Ok(())
    }

    /// Sends DISCONNECT (the session stays on the broker) and waits a
    /// moment for it to go out.
    async fn leave(&mut self, net: &mut mpsc::Receiver<NetEvent>) {
        let Some(link) = self.link.take() else {
            return;
        };
        if link.client.try_disconnect().is_err() {
            return;
        }
        let _ = tokio::time::timeout(GOODBYE, async {
            while let Some(event) = net.recv().await {
                if matches!(event, NetEvent::Closed | NetEvent::Lost { .. }) {
                    break;
                }
            }
        })
        .await;
    }
}

/// The messages of a history result; entries that do not parse are skipped.
fn messages_of(result: &Value) -> Vec<Message> {
    result["messages"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| serde_json::from_value(m.clone()).ok())
                .collect()
        })
        .unwrap_or_default()
}
