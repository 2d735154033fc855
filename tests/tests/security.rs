//! Security: who may connect (static users, argon2, JWT, anonymous), who
//! owns a client id, and what each user may publish and subscribe to
//! (`[[acl.rules]]`), checked with real clients over TCP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::Argon2;
use chatmq_tests::tools::openssl_pair;
use chatmq_tests::{v4, v5, Broker};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

const QUIET: Duration = Duration::from_millis(500);

/// Connects a 3.1.1 client; `Err` is the CONNACK refusal code.
async fn v4_login(
    b: &Broker,
    id: &str,
    login: Option<(&str, &str)>,
) -> Result<v4::Client, v4::ConnectReturnCode> {
    let mut o = v4::options(b.addr, id);
    if let Some((user, pass)) = login {
        o.set_credentials(user, pass);
    }
    match v4::connect(o).await {
        Ok(c) => Ok(c),
        Err(v4::ConnectionError::ConnectionRefused(code)) => Err(code),
        Err(e) => panic!("{id}: expected a CONNACK, got {e}"),
    }
}

/// Connects an MQTT 5 client; `Err` is the CONNACK reason code.
async fn v5_login(
    b: &Broker,
    id: &str,
    login: Option<(&str, &str)>,
) -> Result<v5::Client, v5::ConnectReturnCode> {
    let mut o = v5::options(b.addr, id);
    if let Some((user, pass)) = login {
        o.set_credentials(user, pass);
    }
    match v5::connect(o).await {
        Ok(c) => Ok(c),
        Err(v5::ConnectionError::ConnectionRefused(code)) => Err(code),
        Err(e) => panic!("{id}: expected a CONNACK, got {e}"),
    }
}

fn refusal<T, E>(r: Result<T, E>) -> E {
    match r {
        Ok(_) => panic!("the connection was accepted"),
        Err(code) => code,
    }
}

fn argon2_phc(password: &str) -> String {
    let salt = SaltString::encode_b64(b"chatmq-test-salt").expect("salt");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("hash")
        .to_string()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn token(alg: Algorithm, key: &EncodingKey, sub: &str, exp: u64) -> String {
    encode(
        &Header::new(alg),
        &serde_json::json!({ "sub": sub, "exp": exp }),
        key,
    )
    .expect("sign token")
}

fn rsa_pair(dir: &Path, name: &str) -> (EncodingKey, PathBuf) {
    let (private, public) = openssl_pair(
        dir,
        name,
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let pem = std::fs::read(private).expect("private key");
    (EncodingKey::from_rsa_pem(&pem).expect("RSA key"), public)
}

fn ec_pair(dir: &Path, name: &str) -> (EncodingKey, PathBuf) {
    let (private, public) = openssl_pair(
        dir,
        name,
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let pem = std::fs::read(private).expect("private key");
    (EncodingKey::from_ec_pem(&pem).expect("EC key"), public)
}

const USERS: &str = r#"
[[auth.users]]
name = "alice"
password = "wonderland"
"#;

// alice is a static user with a plaintext password: the right password
// connects in both versions; a wrong one is refused with Bad user name or
// password, 0x04 in 3.1.1 [MQTT-3.1.4-2] and 0x86 in MQTT 5. A user that
// is not configured is refused the same way.
#[tokio::test]
async fn a_static_user_connects_with_the_right_password_only() {
    let broker = Broker::start(USERS);
    v4_login(&broker, "a1", Some(("alice", "wonderland")))
        .await
        .expect("3.1.1 with the right password");
    v5_login(&broker, "a2", Some(("alice", "wonderland")))
        .await
        .expect("MQTT 5 with the right password");
    assert_eq!(
        refusal(v4_login(&broker, "a3", Some(("alice", "looking-glass"))).await),
        v4::ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        refusal(v5_login(&broker, "a4", Some(("alice", "looking-glass"))).await),
        v5::ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        refusal(v4_login(&broker, "a5", Some(("mallory", "wonderland"))).await),
        v4::ConnectReturnCode::BadUserNamePassword
    );
}

// The operator stores bob's password as an argon2id PHC string instead of
// plaintext: bob connects with the password itself, not with the hash, and
// a wrong password is refused.
#[tokio::test]
async fn a_static_user_with_an_argon2_password_hash() {
    let phc = argon2_phc("s3cret-bob");
    assert!(phc.starts_with("$argon2id$"));
    let broker = Broker::start(&format!(
        "[[auth.users]]\nname = \"bob\"\npassword = \"{phc}\"\n"
    ));
    v4_login(&broker, "b1", Some(("bob", "s3cret-bob")))
        .await
        .expect("the password matches its hash");
    v5_login(&broker, "b2", Some(("bob", "s3cret-bob")))
        .await
        .expect("the password matches its hash (MQTT 5)");
    assert_eq!(
        refusal(v4_login(&broker, "b3", Some(("bob", "s3cret-bo"))).await),
        v4::ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        refusal(v5_login(&broker, "b4", Some(("bob", &phc))).await),
        v5::ConnectReturnCode::BadUserNamePassword,
        "the hash itself is not a password"
    );
}

// With the default configuration a client without credentials is refused:
// Not authorized, 0x05 in 3.1.1 and 0x87 in MQTT 5.
#[tokio::test]
async fn anonymous_clients_are_refused_by_default() {
    let broker = Broker::start(USERS);
    assert_eq!(
        refusal(v4_login(&broker, "anon4", None).await),
        v4::ConnectReturnCode::NotAuthorized
    );
    assert_eq!(
        refusal(v5_login(&broker, "anon5", None).await),
        v5::ConnectReturnCode::NotAuthorized
    );
}

// An operator who sets auth.allow_anonymous = true lets clients in without
// credentials, while configured users still log in.
#[tokio::test]
async fn anonymous_clients_connect_when_allowed() {
    let broker = Broker::start(&format!("[auth]\nallow_anonymous = true\n{USERS}"));
    v4_login(&broker, "anon4", None)
        .await
        .expect("anonymous 3.1.1");
    v5_login(&broker, "anon5", None)
        .await
        .expect("anonymous MQTT 5");
    v4_login(&broker, "alice", Some(("alice", "wonderland")))
        .await
        .expect("alice");
    assert_eq!(
        refusal(v4_login(&broker, "alice2", Some(("alice", "wrong"))).await),
        v4::ConnectReturnCode::BadUserNamePassword,
        "a wrong password is not turned into an anonymous login"
    );
}

// The app server signs user JWTs with an HS256 secret (auth.jwt_secret).
// alice's token logs her in (3.1.1 and MQTT 5). A token for alice does not
// log in bob (sub must equal the user name); an expired token and a token
// signed with another secret are refused with 0x04 / 0x86.
#[tokio::test]
async fn hs256_tokens_log_in_their_subject_only_while_valid() {
    let broker = Broker::start("[auth]\njwt_secret = \"app-server-secret\"\n");
    let key = EncodingKey::from_secret(b"app-server-secret");
    let alice = token(Algorithm::HS256, &key, "alice", now() + 300);
    v4_login(&broker, "j1", Some(("alice", &alice)))
        .await
        .expect("alice's token");
    v5_login(&broker, "j2", Some(("alice", &alice)))
        .await
        .expect("alice's token (MQTT 5)");

    assert_eq!(
        refusal(v4_login(&broker, "j3", Some(("bob", &alice))).await),
        v4::ConnectReturnCode::BadUserNamePassword,
        "sub must be the user name"
    );
    let expired = token(Algorithm::HS256, &key, "alice", now() - 60);
    assert_eq!(
        refusal(v4_login(&broker, "j4", Some(("alice", &expired))).await),
        v4::ConnectReturnCode::BadUserNamePassword,
        "expired"
    );
    let forged = token(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"someone-else"),
        "alice",
        now() + 300,
    );
    assert_eq!(
        refusal(v5_login(&broker, "j5", Some(("alice", &forged))).await),
        v5::ConnectReturnCode::BadUserNamePassword,
        "signed with another secret"
    );
}

// The identity provider signs with an RSA key; the broker holds only the
// public key (auth.jwt_public_key). An RS256 token for alice logs her in;
// one signed with a different RSA key is refused, and so is an HS256
// token that uses the public key file as its secret (algorithm confusion).
#[tokio::test]
async fn rs256_tokens_are_checked_against_the_public_key() {
    let keys = tempfile::tempdir().expect("temp dir");
    let (signer, public) = rsa_pair(keys.path(), "idp");
    let (stranger, _) = rsa_pair(keys.path(), "stranger");
    let broker = Broker::start(&format!(
        "[auth]\njwt_public_key = \"{}\"\n",
        public.display()
    ));
    let good = token(Algorithm::RS256, &signer, "alice", now() + 300);
    v4_login(&broker, "r1", Some(("alice", &good)))
        .await
        .expect("RS256 token");
    v5_login(&broker, "r2", Some(("alice", &good)))
        .await
        .expect("RS256 token (MQTT 5)");
    assert_eq!(
        refusal(v4_login(&broker, "r3", Some(("bob", &good))).await),
        v4::ConnectReturnCode::BadUserNamePassword,
        "sub must be the user name"
    );
    let other = token(Algorithm::RS256, &stranger, "alice", now() + 300);
    assert_eq!(
        refusal(v4_login(&broker, "r4", Some(("alice", &other))).await),
        v4::ConnectReturnCode::BadUserNamePassword,
        "signed with another key"
    );
    let expired = token(Algorithm::RS256, &signer, "alice", now() - 60);
    assert_eq!(
        refusal(v4_login(&broker, "r5", Some(("alice", &expired))).await),
        v4::ConnectReturnCode::BadUserNamePassword,
        "expired"
    );
    let pem = std::fs::read(&public).expect("public key");
    let confused = token(
        Algorithm::HS256,
        &EncodingKey::from_secret(&pem),
        "alice",
        now() + 300,
    );
    assert_eq!(
        refusal(v5_login(&broker, "r6", Some(("alice", &confused))).await),
        v5::ConnectReturnCode::BadUserNamePassword,
        "HS256 with the public key as secret"
    );
}

// The same with an ECDSA P-256 key: ES256 tokens from the holder of the
// private key log in; tokens from another P-256 key are refused.
#[tokio::test]
async fn es256_tokens_are_checked_against_the_public_key() {
    let keys = tempfile::tempdir().expect("temp dir");
    let (signer, public) = ec_pair(keys.path(), "idp");
    let (stranger, _) = ec_pair(keys.path(), "stranger");
    let broker = Broker::start(&format!(
        "[auth]\njwt_public_key = \"{}\"\n",
        public.display()
    ));
    let good = token(Algorithm::ES256, &signer, "alice", now() + 300);
    v4_login(&broker, "e1", Some(("alice", &good)))
        .await
        .expect("ES256 token");
    v5_login(&broker, "e2", Some(("alice", &good)))
        .await
        .expect("ES256 token (MQTT 5)");
    let other = token(Algorithm::ES256, &stranger, "alice", now() + 300);
    assert_eq!(
        refusal(v4_login(&broker, "e3", Some(("alice", &other))).await),
        v4::ConnectReturnCode::BadUserNamePassword,
        "signed with another key"
    );
    let expired = token(Algorithm::ES256, &signer, "alice", now() - 60);
    assert_eq!(
        refusal(v5_login(&broker, "e4", Some(("alice", &expired))).await),
        v5::ConnectReturnCode::BadUserNamePassword,
        "expired"
    );
}

// alice's phone connects with client id "phone-1", which makes it hers.
// bob presenting "phone-1" is refused with Not authorized (0x05 / 0x87),
// while alice is connected and after she left, and still after a broker
// restart; alice herself reconnects with it freely.
#[tokio::test]
async fn a_client_id_belongs_to_the_first_user_who_used_it() {
    let mut broker = Broker::start(&format!(
        "{USERS}\n[[auth.users]]\nname = \"bob\"\npassword = \"builder\"\n"
    ));
    let alice = v4_login(&broker, "phone-1", Some(("alice", "wonderland")))
        .await
        .expect("alice");
    assert_eq!(
        refusal(v4_login(&broker, "phone-1", Some(("bob", "builder"))).await),
        v4::ConnectReturnCode::NotAuthorized,
        "while alice is connected"
    );
    alice.disconnect().await;
    assert_eq!(
        refusal(v4_login(&broker, "phone-1", Some(("bob", "builder"))).await),
        v4::ConnectReturnCode::NotAuthorized,
        "after alice left"
    );
    assert_eq!(
        refusal(v5_login(&broker, "phone-1", Some(("bob", "builder"))).await),
        v5::ConnectReturnCode::NotAuthorized
    );
    v5_login(&broker, "phone-1", Some(("alice", "wonderland")))
        .await
        .expect("alice reconnects")
        .disconnect()
        .await;
    v4_login(&broker, "phone-2", Some(("bob", "builder")))
        .await
        .expect("bob has his own ids");

    broker.restart();
    assert_eq!(
        refusal(v4_login(&broker, "phone-1", Some(("bob", "builder"))).await),
        v4::ConnectReturnCode::NotAuthorized,
        "ownership survives a restart"
    );
    v4_login(&broker, "phone-1", Some(("alice", "wonderland")))
        .await
        .expect("alice after the restart");
}

const ACL: &str = r#"
[[auth.users]]
name = "alice"
password = "a"
[[auth.users]]
name = "bob"
password = "b"
[[auth.users]]
name = "editor"
password = "e"

# Everyone owns home/<user>/# and devices/<client id>/#.
[[acl.rules]]
user = "*"
topic = "home/%u/#"
access = "pubsub"
[[acl.rules]]
user = "*"
topic = "devices/%c/#"
access = "pubsub"

# News: everyone reads, the editor writes, except drafts; alice may not
# read the internal news.
[[acl.rules]]
user = "*"
topic = "news/#"
access = "sub"
[[acl.rules]]
user = "editor"
topic = "news/#"
access = "pub"
[[acl.rules]]
user = "editor"
topic = "news/drafts/#"
access = "deny"
[[acl.rules]]
user = "alice"
topic = "news/internal/#"
access = "deny"

# Anyone may drop a message into an inbox; only bob reads them.
[[acl.rules]]
user = "*"
topic = "inbox/#"
access = "pub"
[[acl.rules]]
user = "bob"
topic = "inbox/#"
access = "sub"
"#;

async fn acl_v5(b: &Broker, user: &str, id: &str) -> v5::Client {
    let pass = &user[..1];
    match v5_login(b, id, Some((user, pass))).await {
        Ok(c) => c,
        Err(code) => panic!("{user} refused: {code:?}"),
    }
}

async fn acl_v4(b: &Broker, user: &str, id: &str) -> v4::Client {
    let pass = &user[..1];
    match v4_login(b, id, Some((user, pass))).await {
        Ok(c) => c,
        Err(code) => panic!("{user} refused: {code:?}"),
    }
}

fn v5_granted(s: &v5::SubAck) -> bool {
    matches!(s.return_codes[..], [v5::SubscribeReasonCode::Success(_)])
}

fn v5_not_authorized(s: &v5::SubAck) -> bool {
    s.return_codes[..] == [v5::SubscribeReasonCode::NotAuthorized]
}

/// The reason of the PUBACK a QoS 1 publish got.
async fn v5_puback(c: &mut v5::Client, topic: &str, payload: &[u8]) -> v5::PubAckReason {
    match c
        .publish_acked(topic, v5::QoS::AtLeastOnce, false, payload)
        .await
    {
        Some(v5::Packet::PubAck(a)) => a.reason,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

// Rules with %u: alice may use home/alice/# but not bob's home. Her
// SUBSCRIBE to home/bob/# gets 0x87 (MQTT 5) / 0x80 (3.1.1); her PUBLISH
// to bob's home gets PUBACK 0x87 in MQTT 5 and is not routed: bob, who is
// subscribed there, sees nothing. 3.1.1 cannot be told: alice gets a
// normal PUBACK, and still nothing is routed.
#[tokio::test]
async fn user_rules_confine_each_user_to_their_own_topics() {
    let broker = Broker::start(ACL);
    let mut bob = acl_v5(&broker, "bob", "bob-1").await;
    assert!(v5_granted(
        &bob.subscribe("home/bob/#", v5::QoS::AtLeastOnce).await
    ));
    let mut alice = acl_v5(&broker, "alice", "alice-1").await;
    assert!(v5_granted(
        &alice.subscribe("home/alice/#", v5::QoS::AtLeastOnce).await
    ));
    assert!(v5_not_authorized(
        &alice.subscribe("home/bob/#", v5::QoS::AtLeastOnce).await
    ));
    assert_eq!(
        v5_puback(&mut alice, "home/bob/door", b"open").await,
        v5::PubAckReason::NotAuthorized
    );
    let mut alice4 = acl_v4(&broker, "alice", "alice-2").await;
    let refused = alice4.subscribe("home/bob/#", v4::QoS::AtLeastOnce).await;
    assert_eq!(refused.return_codes, [v4::SubscribeReasonCode::Failure]);
    alice4
        .publish_acked("home/bob/window", v4::QoS::AtLeastOnce, false, b"open")
        .await;

    // bob's own message is the first thing he sees: alice's were dropped.
    let mut bob2 = acl_v5(&broker, "bob", "bob-2").await;
    assert_eq!(
        v5_puback(&mut bob2, "home/bob/door", b"closed").await,
        v5::PubAckReason::Success
    );
    assert_eq!(&bob.publish().await.payload[..], b"closed");
    bob.no_publish(QUIET).await;

    // alice's own home works (QoS 0, so her PUBLISH is the only answer).
    alice
        .publish_acked("home/alice/lamp", v5::QoS::AtMostOnce, false, b"on")
        .await;
    assert_eq!(&alice.publish().await.payload[..], b"on");
}

// Rules with %c: a device may use devices/<its client id>/# only.
#[tokio::test]
async fn client_id_rules_confine_each_device_to_its_own_topics() {
    let broker = Broker::start(ACL);
    let mut dev = acl_v5(&broker, "alice", "dev-a").await;
    assert!(v5_granted(
        &dev.subscribe("devices/dev-a/#", v5::QoS::AtLeastOnce).await
    ));
    assert!(v5_not_authorized(
        &dev.subscribe("devices/dev-b/#", v5::QoS::AtLeastOnce).await
    ));
    assert_eq!(
        v5_puback(&mut dev, "devices/dev-b/cmd", b"reboot").await,
        v5::PubAckReason::NotAuthorized
    );
    // QoS 0, so the device's own PUBLISH is the only answer.
    dev.publish_acked("devices/dev-a/state", v5::QoS::AtMostOnce, false, b"up")
        .await;
    assert_eq!(&dev.publish().await.payload[..], b"up");
}

// Pub-only and sub-only rules: everyone may read news but only the editor
// writes it; anyone may drop a message into an inbox but only bob reads.
#[tokio::test]
async fn publish_only_and_subscribe_only_rules() {
    let broker = Broker::start(ACL);
    let mut alice = acl_v5(&broker, "alice", "alice-1").await;
    let mut bob = acl_v5(&broker, "bob", "bob-1").await;
    let mut editor = acl_v5(&broker, "editor", "editor-1").await;

    assert!(v5_granted(
        &alice.subscribe("news/sports", v5::QoS::AtLeastOnce).await
    ));
    assert!(v5_not_authorized(
        &editor.subscribe("inbox/#", v5::QoS::AtLeastOnce).await
    ));
    assert!(v5_granted(
        &bob.subscribe("inbox/#", v5::QoS::AtLeastOnce).await
    ));

    assert_eq!(
        v5_puback(&mut alice, "news/sports", b"fake").await,
        v5::PubAckReason::NotAuthorized,
        "news is subscribe-only for alice"
    );
    assert_eq!(
        v5_puback(&mut editor, "news/sports", b"goal").await,
        v5::PubAckReason::Success
    );
    assert_eq!(&alice.publish().await.payload[..], b"goal");
    alice.no_publish(QUIET).await;

    assert_eq!(
        v5_puback(&mut alice, "inbox/bob", b"hi bob").await,
        v5::PubAckReason::Success,
        "inboxes are publish-only for everyone"
    );
    assert_eq!(&bob.publish().await.payload[..], b"hi bob");
}

// A deny rule wins over a grant: the editor may write news/# but not
// news/drafts/#; alice may read news/# but not news/internal/#, so her
// SUBSCRIBE to news/internal/# is refused. Her subscription to news/# is
// granted (it covers more than the denied part), and the deny rule filters
// at delivery: an internal memo reaches bob but not alice.
#[tokio::test]
async fn deny_rules_win_and_filter_wildcard_subscriptions_at_delivery() {
    let broker = Broker::start(ACL);
    let mut alice = acl_v5(&broker, "alice", "alice-1").await;
    let mut bob = acl_v5(&broker, "bob", "bob-1").await;
    let mut editor = acl_v5(&broker, "editor", "editor-1").await;

    assert_eq!(
        v5_puback(&mut editor, "news/drafts/scoop", b"draft").await,
        v5::PubAckReason::NotAuthorized
    );
    assert!(v5_not_authorized(
        &alice
            .subscribe("news/internal/#", v5::QoS::AtLeastOnce)
            .await
    ));
    assert!(v5_granted(
        &alice.subscribe("news/#", v5::QoS::AtLeastOnce).await
    ));
    assert!(v5_granted(
        &bob.subscribe("news/#", v5::QoS::AtLeastOnce).await
    ));

    assert_eq!(
        v5_puback(&mut editor, "news/internal/memo", b"memo").await,
        v5::PubAckReason::Success
    );
    assert_eq!(
        v5_puback(&mut editor, "news/world", b"world").await,
        v5::PubAckReason::Success
    );
    assert_eq!(&bob.publish().await.payload[..], b"memo");
    assert_eq!(&bob.publish().await.payload[..], b"world");
    let first = alice.publish().await;
    assert_eq!(
        &first.payload[..],
        b"world",
        "the memo was filtered for alice"
    );
    alice.no_publish(QUIET).await;
    bob.no_publish(QUIET).await;
}

// What no rule grants is denied: a topic outside every rule can be neither
// subscribed to (0x87 / 0x80) nor published to (PUBACK 0x87).
#[tokio::test]
async fn everything_not_granted_is_denied() {
    let broker = Broker::start(ACL);
    let mut alice = acl_v5(&broker, "alice", "alice-1").await;
    assert!(v5_not_authorized(
        &alice.subscribe("random/#", v5::QoS::AtLeastOnce).await
    ));
    assert!(v5_not_authorized(
        &alice.subscribe("#", v5::QoS::AtLeastOnce).await
    ));
    assert_eq!(
        v5_puback(&mut alice, "random/topic", b"x").await,
        v5::PubAckReason::NotAuthorized
    );
    let mut alice4 = acl_v4(&broker, "alice", "alice-2").await;
    let refused = alice4.subscribe("random/#", v4::QoS::AtLeastOnce).await;
    assert_eq!(refused.return_codes, [v4::SubscribeReasonCode::Failure]);
}
