//! What a caller of the library matches on when a registry fails: transient or not, the HTTP
//! status, the transport's error as `source()`; and timeouts that end a pull from a server
//! that accepts and never answers. The registries here are small servers on 127.0.0.1 that
//! answer every request the one way each test needs.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use bux_fuse::registry::RegistryOptions;
use bux_fuse::{Error, PullOptions, Store};
use common::Bux;

/// A server on 127.0.0.1 answering every request with `answer` (None: accepting and never
/// answering). Returns its `host:port`.
fn server(answer: Option<&'static str>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            match answer {
                None => held.push(conn), // never answered, never closed
                Some(answer) => {
                    std::thread::spawn(move || serve(conn, answer));
                }
            }
        }
    });
    host
}

fn serve(conn: TcpStream, answer: &str) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        // Read one request's head, then answer it (keep-alive: the client may reuse).
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
        }
        if conn.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

fn http(status: &str, content_type: &str, body: &str) -> &'static str {
    Box::leak(
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_boxed_str(),
    )
}

fn pull(host: &str, request_timeout: Duration) -> Error {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let opts = PullOptions {
        registry: RegistryOptions {
            request_timeout: Some(request_timeout),
            connect_timeout: Some(Duration::from_secs(2)),
            ..Default::default()
        },
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reference = format!("{host}/some/image:tag");
    rt.block_on(store.pull(&reference, &opts))
        .expect_err("a pull from a failing registry succeeded")
}

/// Whether an `io::Error` of this kind is among the error's causes.
fn caused_by(e: &Error, kind: std::io::ErrorKind) -> bool {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cur {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == kind)
        {
            return true;
        }
        cur = c.source();
    }
    false
}

#[test]
fn nothing_listening_is_transient_with_its_cause() {
    // A port that was free a moment ago: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = pull(&format!("127.0.0.1:{port}"), Duration::from_secs(5));
    assert!(matches!(e.inner(), Error::Registry { .. }), "{e:?}");
    assert!(e.is_transient(), "{e}");
    assert_eq!(e.status(), None, "{e}");
    assert!(
        caused_by(&e, std::io::ErrorKind::ConnectionRefused),
        "no ConnectionRefused among the causes of {e:?}"
    );
}

#[test]
fn a_server_that_never_answers_times_out() {
    let host = server(None);
    let t = Instant::now();
    let e = pull(&host, Duration::from_secs(1));
    // Without the timeout this waited 600 s; a second of timeout and its retries take a few.
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    assert!(e.is_transient(), "{e}");
    assert!(
        caused_by(&e, std::io::ErrorKind::TimedOut) || e.to_string().contains("no answer"),
        "{e:?}"
    );
}

#[test]
fn statuses_say_whether_to_retry() {
    let envelope = r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#;
    for (answer, status, transient) in [
        (
            http(
                "503 Service Unavailable",
                "text/plain",
                "down for maintenance",
            ),
            503,
            true,
        ),
        (http("502 Bad Gateway", "text/plain", ""), 502, true),
        (
            http("429 Too Many Requests", "application/json", envelope),
            429,
            true,
        ),
        (http("400 Bad Request", "text/plain", "no"), 400, false),
    ] {
        let e = pull(&server(Some(answer)), Duration::from_secs(5));
        assert!(
            matches!(e.inner(), Error::Registry { .. }),
            "{status}: {e:?}"
        );
        assert_eq!(e.status(), Some(status), "{e:?}");
        assert_eq!(e.is_transient(), transient, "{e}");
    }
    // "Not found" is its own variant, and nothing to retry.
    let e = pull(
        &server(Some(http("404 Not Found", "text/plain", ""))),
        Duration::from_secs(5),
    );
    assert!(matches!(e.inner(), Error::NotFound { .. }), "{e:?}");
    assert!(!e.is_transient());
}

#[test]
fn the_cli_says_it_in_one_line() {
    let host = server(None);
    let bux = Bux::new();
    let err = bux.fails(&[
        "pull",
        "-q",
        "--request-timeout",
        "1",
        &format!("{host}/some/image:tag"),
    ]);
    eprintln!("{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("no answer") || err.contains("timed out"),
        "{err}"
    );
    let err = bux.fails(&["pull", "--request-timeout=0", "x"]);
    assert!(err.contains("seconds"), "{err}");
}
