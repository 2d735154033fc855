//! `rumqttd-baseline CONFIG.toml`: runs rumqttd 0.20 with the given
//! configuration (the comparison writes one per run, on free ports), and
//! prints `rumqttd: ready` once its listeners are starting.

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: rumqttd-baseline CONFIG.toml");
        std::process::exit(2);
    };
    let config = config::Config::builder()
        .add_source(config::File::new(&path, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<rumqttd::Config>());
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rumqttd-baseline: {path}: {e}");
            std::process::exit(2);
        }
    };
    let mut broker = rumqttd::Broker::new(config);
    println!("rumqttd: ready");
    if let Err(e) = broker.start() {
        eprintln!("rumqttd-baseline: {e}");
        std::process::exit(1);
    }
}
