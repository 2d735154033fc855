//! What a browser gets from the HTTP port: the files of `[http] static_dir`
//! (the web demo) and `/v1/client-config`, which says where MQTT over
//! WebSocket listens.

use chatmq_tests::http::Http;
use chatmq_tests::{Broker, OPEN};

fn site(dir: &std::path::Path) -> std::path::PathBuf {
    let root = dir.join("site");
    std::fs::create_dir_all(root.join("assets")).expect("mkdir");
    std::fs::write(
        root.join("index.html"),
        "<!doctype html><title>chat</title>",
    )
    .expect("write");
    std::fs::write(root.join("assets/app.js"), "console.log('hi')").expect("write");
    std::fs::write(root.join("manifest.webmanifest"), "{\"name\":\"chat\"}").expect("write");
    std::fs::write(dir.join("secret.txt"), "not for the web").expect("write");
    root
}

#[tokio::test]
async fn the_static_dir_is_served_at_the_root_with_content_types() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = site(dir.path());
    let config = format!("{OPEN}\n[http]\nstatic_dir = \"{}\"\n", root.display());
    let b = Broker::start(&config);
    let http = Http::new(b.http_addr);

    let index = http.get("/").await;
    assert_eq!(index.status, 200);
    assert!(index.text().contains("<title>chat</title>"));
    assert_eq!(
        index.header("content-type"),
        Some("text/html; charset=utf-8")
    );

    let js = http.get("/assets/app.js").await;
    assert_eq!((js.status, js.text().as_str()), (200, "console.log('hi')"));
    assert_eq!(
        js.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    let manifest = http.get("/manifest.webmanifest").await;
    assert_eq!(
        manifest.header("content-type"),
        Some("application/manifest+json")
    );

    // A path of the app itself (no extension) gets the page; a missing file does not.
    let route = http.get("/conversations/dm:a:b").await;
    assert_eq!(route.status, 200);
    assert!(route.text().contains("<title>chat</title>"));
    assert_eq!(http.get("/assets/missing.js").await.status, 404);

    // Nothing outside the directory, however the path is spelled.
    for path in [
        "/../secret.txt",
        "/assets/../../secret.txt",
        "/%2e%2e/secret.txt",
    ] {
        let r = http.get(path).await;
        assert!(
            !r.text().contains("not for the web"),
            "{path} leaked: {}",
            r.text()
        );
    }

    // The API keeps its own routes.
    assert_eq!(http.get("/healthz").await.status, 200);
    let typo = http.get("/v1/conversationz").await;
    assert_eq!(
        (typo.status, typo.error_code().as_str()),
        (404, "not_found"),
        "an API typo is an API error"
    );
}

#[tokio::test]
async fn without_a_static_dir_unknown_paths_are_json_404s() {
    let b = Broker::start(OPEN);
    let r = Http::new(b.http_addr).get("/index.html").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "not_found");
}

#[tokio::test]
async fn client_config_tells_a_page_where_websocket_listens() {
    let b = Broker::start(OPEN);
    let r = Http::new(b.http_addr).get("/v1/client-config").await;
    assert_eq!(r.status, 200);
    let ws = &r.json()["websocket"];
    assert_eq!(ws["path"], "/mqtt");
    assert_eq!(ws["port"], b.ws_addr().port());
    assert!(ws["tls_port"].is_null());
}
