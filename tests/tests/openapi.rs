//! The HTTP API's OpenAPI document, as an app developer fetches it from a
//! running broker: served at `/v1/openapi.json` without a token, OpenAPI 3
//! shaped, and complete. Complete means: every route the router serves
//! (the list comes from the code, `chatmq_broker::http::routes()`, the
//! same table the router is built from) is in the document with its
//! methods, and the document lists nothing else; each of those routes is
//! really routed by the binary (its answer is not the fallback's 404 or a
//! 405); and the main operations carry the parameters, bodies, answers and
//! tokens they take.

use std::collections::BTreeSet;

use chatmq_tests::chat;
use chatmq_tests::http::Http;
use chatmq_tests::Broker;
use serde_json::Value;

const ADMIN: &str = "openapi-tests-admin-token";

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn start() -> Broker {
    Broker::start(&chat::config(&format!("admin_token = \"{ADMIN}\"")))
}

/// The document, fetched as anyone would: no token.
async fn fetch(b: &Broker) -> Value {
    let r = Http::new(b.http_addr).get("/v1/openapi.json").await;
    assert_eq!(r.status, 200, "GET /v1/openapi.json: {}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    r.json()
}

/// `{"$ref": "#/components/schemas/X"}` resolved in `doc` (one level).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(r) => {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("a local schema ref: {r}"));
            &doc["components"]["schemas"][name]
        }
        None => v,
    }
}

fn operation<'a>(doc: &'a Value, method: &str, path: &str) -> &'a Value {
    let op = &doc["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is documented");
    op
}

/// The names of an object schema's `required` list.
fn required(schema: &Value) -> BTreeSet<&str> {
    schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The security schemes an operation accepts (one per alternative).
fn schemes(op: &Value) -> BTreeSet<&str> {
    op["security"]
        .as_array()
        .map(|alternatives| {
            alternatives
                .iter()
                .filter_map(Value::as_object)
                .flat_map(|a| a.keys().map(String::as_str))
                .collect()
        })
        .unwrap_or_default()
}

/// A request path for a route, its `{params}` filled with harmless values.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| match seg {
            "{seq}" => "1",
            "{emoji}" => "%F0%9F%91%8D",
            s if s.starts_with('{') => "openapi-probe",
            s => s,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn every_route_the_router_serves_is_documented_with_its_methods() {
    let b = start();
    let doc = fetch(&b).await;

    let served: BTreeSet<(String, String)> = chatmq_broker::http::routes()
        .into_iter()
        .map(|(m, p)| (m.as_str().to_lowercase(), p.to_string()))
        .collect();
    assert!(
        served.len() >= 20,
        "the route table is the router's: {served:?}"
    );
    let paths = doc["paths"].as_object().expect("paths is an object");
    let documented: BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(move |m| (m.to_string(), path.clone()))
        })
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let not_served: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "routes served but missing from /v1/openapi.json (annotate the handler with \
         #[utoipa::path] and list it in http/openapi.rs): {undocumented:?}"
    );
    assert!(
        not_served.is_empty(),
        "operations in /v1/openapi.json that the router does not serve: {not_served:?}"
    );

    // The binary routes each of them: a request without a token gets the
    // route's own answer (200, or 401 where a token is needed), never the
    // fallback's "no such route" or a 405.
    let anyone = Http::new(b.http_addr);
    for (method, path) in &served {
        let method = method.to_uppercase();
        let body = (method != "GET").then_some(&b"{}"[..]);
        let r = anyone.request(&method, &concrete(path), body).await;
        let fallback = r.status == 404 && r.json()["error"]["message"] == "no such route";
        assert!(
            !fallback && r.status != 405,
            "{method} {path} is routed: {} {}",
            r.status,
            r.text()
        );
    }
}

#[tokio::test]
async fn the_document_is_openapi_3_and_describes_the_main_operations() {
    let b = start();
    let doc = fetch(&b).await;

    // OpenAPI 3 shaped.
    let version = doc["openapi"].as_str().expect("openapi version");
    assert!(version.starts_with("3."), "openapi {version}");
    assert_eq!(doc["info"]["title"], "chatmq HTTP API");
    assert!(doc["info"]["version"].is_string(), "info.version");
    assert!(doc["components"]["schemas"].is_object(), "components");

    // Every operation answers something, and every `{param}` of its path
    // is a declared, required path parameter.
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let templated: BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        for method in METHODS {
            let Some(op) = item.get(method) else { continue };
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path} has responses"
            );
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path" && p["required"] == true)
                        .filter_map(|p| p["name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(declared, templated, "{method} {path}: path parameters");
        }
    }

    // The two bearer tokens.
    let security = &doc["components"]["securitySchemes"];
    assert_eq!(security["user_jwt"]["type"], "http");
    assert_eq!(security["user_jwt"]["scheme"], "bearer");
    assert_eq!(security["user_jwt"]["bearerFormat"], "JWT");
    assert_eq!(security["admin_token"]["type"], "http");
    assert_eq!(security["admin_token"]["scheme"], "bearer");

    // The error shape, as a real error answer has it.
    let error = &doc["components"]["schemas"]["Error"];
    assert_eq!(required(error), BTreeSet::from(["error"]));
    let detail = resolve(&doc, &error["properties"]["error"]);
    assert_eq!(required(detail), BTreeSet::from(["code", "message"]));
    let refused = Http::new(b.http_addr).get("/v1/conversations").await;
    assert_eq!(refused.status, 401);
    let real = refused.json();
    let real_keys: BTreeSet<&str> = real["error"]
        .as_object()
        .expect("error object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(real_keys, required(detail), "{real}");

    // Server-side send: the envelope body, the seq, errors, both tokens.
    let send = operation(&doc, "post", "/v1/conversations/{conv}/messages");
    let body = resolve(
        &doc,
        &send["requestBody"]["content"]["application/json"]["schema"],
    );
    assert_eq!(required(body), BTreeSet::from(["id", "body"]));
    for key in ["type", "from"] {
        assert!(body["properties"][key].is_object(), "send body has {key}");
    }
    let ok = resolve(
        &doc,
        &send["responses"]["200"]["content"]["application/json"]["schema"],
    );
    assert_eq!(required(ok), BTreeSet::from(["conv", "seq"]));
    for status in ["400", "401", "403", "404", "413", "503"] {
        let schema = &send["responses"][status]["content"]["application/json"]["schema"];
        assert_eq!(
            schema["$ref"], "#/components/schemas/Error",
            "send {status} is an Error"
        );
    }
    assert_eq!(
        schemes(send),
        BTreeSet::from(["admin_token", "user_jwt"]),
        "send takes either token"
    );

    // History: the page query and the page.
    let history = operation(&doc, "get", "/v1/conversations/{conv}/messages");
    let query: BTreeSet<&str> = history["parameters"]
        .as_array()
        .expect("history parameters")
        .iter()
        .filter(|p| p["in"] == "query")
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(query, BTreeSet::from(["after", "before", "limit"]));
    let page = resolve(
        &doc,
        &history["responses"]["200"]["content"]["application/json"]["schema"],
    );
    assert_eq!(
        required(page),
        BTreeSet::from(["messages", "head", "first", "epoch"])
    );

    // Creating a conversation: the body's fields, 201.
    let create = operation(&doc, "post", "/v1/conversations");
    let body = resolve(
        &doc,
        &create["requestBody"]["content"]["application/json"]["schema"],
    );
    for key in ["conv", "title", "members", "owner"] {
        assert!(body["properties"][key].is_object(), "create body has {key}");
    }
    assert!(create["responses"]["201"].is_object(), "create answers 201");

    // The operator's reload: the admin token only, and its refusals.
    let reload = operation(&doc, "post", "/v1/admin/reload");
    assert_eq!(schemes(reload), BTreeSet::from(["admin_token"]));
    for status in ["200", "401", "403", "409", "422"] {
        assert!(reload["responses"][status].is_object(), "reload {status}");
    }

    // What needs no token says so: no security requirement.
    for path in ["/healthz", "/readyz", "/metrics", "/v1/openapi.json"] {
        assert!(
            schemes(operation(&doc, "get", path)).is_empty(),
            "{path} takes no token"
        );
    }
}
