//! What a browser needs besides the API: the files of `[http] static_dir`
//! (the web demo) at `/`, and `/v1/client-config`, which tells a page where
//! MQTT over WebSocket listens, since that is another port than this one.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::openapi::ClientConfig;
use super::{Api, ApiError};

/// `GET /v1/client-config`, no authentication: the WebSocket listeners'
/// ports and path; a page joins them to its own host name.
#[utoipa::path(
    get,
    path = "/v1/client-config",
    tag = "web",
    responses((status = 200, description = "The WebSocket listeners", body = ClientConfig)),
)]
pub async fn client_config(State(api): State<Arc<Api>>) -> Json<Value> {
    let port = |name: &str| {
        api.edges
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, addr)| addr.port())
    };
    Json(json!({
        "websocket": {
            "path": api.broker.settings.websocket.path,
            "port": port("websocket"),
            "tls_port": port("websocket-tls"),
        }
    }))
}

/// The fallback route: a file under `static_dir` for GET and HEAD, else the
/// API's JSON 404. A path with no file extension that matches nothing gets
/// `index.html`, so a single-page app can own its URLs; `/v1/...` never does.
pub async fn static_file(State(api): State<Arc<Api>>, request: Request) -> Response {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route");
    let Some(root) = &api.broker.settings.http.static_dir else {
        return not_found().into_response();
    };
    let is_read = request.method() == Method::GET || request.method() == Method::HEAD;
    // A mistyped API route stays an API error, never the app's page.
    if !is_read || request.uri().path().starts_with("/v1/") {
        return not_found().into_response();
    }
    let Some(relative) = safe_relative(request.uri().path()) else {
        return not_found().into_response();
    };
    let root = root.clone();
    let read = tokio::task::spawn_blocking(move || {
        let mut path = root.join(&relative);
        if path.is_dir() {
            path = path.join("index.html");
        }
        if !path.is_file() && relative.extension().is_none() {
            path = root.join("index.html");
        }
        std::fs::read(&path).map(|body| (path, body))
    });
    match read.await {
        Ok(Ok((path, body))) => {
            let mut response = body.into_response();
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type(&path)));
            // The demo is rebuilt in place; let browsers revalidate.
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            response
        }
        _ => not_found().into_response(),
    }
}

/// The request path as a relative file path, or `None` if it tries to
/// leave the directory (`..`, a root, a drive prefix).
fn safe_relative(uri_path: &str) -> Option<PathBuf> {
    let trimmed = uri_path.trim_start_matches('/');
    let relative = Path::new(trimmed);
    relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| relative.to_path_buf())
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "webmanifest" => "application/manifest+json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "txt" => "text/plain; charset=utf-8",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_leave_the_directory() {
        assert_eq!(safe_relative("/app.js"), Some(PathBuf::from("app.js")));
        assert_eq!(safe_relative("/"), Some(PathBuf::from("")));
        assert_eq!(safe_relative("/a/b.css"), Some(PathBuf::from("a/b.css")));
        assert_eq!(safe_relative("/../etc/passwd"), None);
        assert_eq!(safe_relative("/a/../../x"), None);
        assert_eq!(
            safe_relative("//etc/passwd"),
            Some(PathBuf::from("etc/passwd"))
        );
    }
}
