//! Where the broker is: `HOST:PORT` or a URL whose scheme picks the
//! transport.

use std::str::FromStr;

use crate::Error;

/// How the client reaches the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// MQTT over TCP.
    Tcp,
    /// MQTT over TLS.
    Tls,
    /// MQTT over WebSocket at this URL.
    Ws(String),
    /// MQTT over secure WebSocket at this URL.
    Wss(String),
}

/// A broker address, parsed from `HOST:PORT`, `mqtt://HOST:PORT` (TCP),
/// `mqtts://HOST:PORT` (TLS), `ws://HOST:PORT/PATH` or
/// `wss://HOST:PORT/PATH` (MQTT over WebSocket, e.g. `/mqtt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub transport: Transport,
}

impl Server {
    /// Whether the transport needs TLS roots.
    pub fn uses_tls(&self) -> bool {
        matches!(self.transport, Transport::Tls | Transport::Wss(_))
    }
}

impl FromStr for Server {
    type Err = Error;

    /// The WebSocket forms keep the whole URL, which rumqttc connects to.
    fn from_str(server: &str) -> Result<Server, Error> {
        let bad = |why: String| Err(Error::Options(why));
        let (scheme, rest) = server.split_once("://").unwrap_or(("mqtt", server));
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let Some((host, port)) = authority
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
            .filter(|(h, _)| !h.is_empty())
        else {
            return bad(format!("{server:?} needs a HOST:PORT"));
        };
        let transport = match scheme {
            "mqtt" | "tcp" if path.is_empty() => Transport::Tcp,
            "mqtts" | "ssl" if path.is_empty() => Transport::Tls,
            "ws" => Transport::Ws(server.to_string()),
            "wss" => Transport::Wss(server.to_string()),
            "mqtt" | "tcp" | "mqtts" | "ssl" => {
                return bad(format!("{server:?}: MQTT over TCP has no path"))
            }
            other => {
                return bad(format!(
                    "{server:?}: unknown scheme {other:?} (mqtt, mqtts, ws, wss)"
                ))
            }
        };
        Ok(Server {
            host: host.to_string(),
            port,
            transport,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(s: &str) -> (String, u16, Transport) {
        let o: Server = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        (o.host, o.port, o.transport)
    }

    fn err(s: &str) -> String {
        s.parse::<Server>().unwrap_err().to_string()
    }

    #[test]
    fn the_scheme_picks_the_transport() {
        assert_eq!(server("h:1883"), ("h".into(), 1883, Transport::Tcp));
        assert_eq!(server("mqtt://h:1883"), ("h".into(), 1883, Transport::Tcp));
        assert_eq!(server("mqtts://h:8883"), ("h".into(), 8883, Transport::Tls));
        let ws = "ws://chat.example.com:8083/mqtt";
        assert_eq!(
            server(ws),
            ("chat.example.com".into(), 8083, Transport::Ws(ws.into()))
        );
        let wss = "wss://[::1]:8084/mqtt";
        assert_eq!(
            server(wss),
            ("::1".into(), 8084, Transport::Wss(wss.into()))
        );
        assert!(wss.parse::<Server>().unwrap().uses_tls());
        assert!(!"h:1".parse::<Server>().unwrap().uses_tls());
    }

    #[test]
    fn mistakes_are_named() {
        assert!(err("http://h:80").contains("unknown scheme"));
        assert!(err("mqtt://h:1/x").contains("no path"));
        assert!(err("wss://h/mqtt").contains("HOST:PORT"));
        assert!(err("h").contains("HOST:PORT"));
        assert!(err(":1").contains("HOST:PORT"));
    }
}
