//! Static assets over real sockets: validators, ranges, precompressed
//! variants, directories, traversal attempts and the hot-file cache.
//!
//! Each test starts a real edge node on an ephemeral port with one site
//! mounted at `/`. Unix only: the fixtures include symlinks.
#![cfg(unix)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use http::Method;
use reqwest::StatusCode;
use reqwest::header::{self, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "TOP-SECRET-do-not-serve-7f3a";
const HELLO: &str = "hello world\n";
const APP_JS: &str = "console.log('identity variant');\n";
const APP_JS_BR: &[u8] = b"\x0b\x02\x80BROTLI-BYTES";
const APP_JS_GZ: &[u8] = b"\x1f\x8b\x08\x00GZIP-BYTES-LONGER";
const STYLE_CSS_GZ: &[u8] = b"\x1f\x8b\x08\x00CSS-GZ";
const BIG_LEN: usize = 1024 * 1024;

struct Fixture {
    _dir: tempfile::TempDir,
    /// Runs until the test's runtime ends.
    _node: breakwater_edge::RunningNode,
    root: PathBuf,
    addr: SocketAddr,
    client: reqwest::Client,
}

impl Fixture {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        self.request(Method::GET, path, headers).await
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self.client.request(method, self.url(path));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.send().await.expect("request completes")
    }
}

fn digits() -> Vec<u8> {
    (0..100u8).map(|i| b'0' + i % 10).collect()
}

/// A 1 MiB file whose every offset is recognisable.
fn big() -> Vec<u8> {
    (0..BIG_LEN).map(|i| (i % 251) as u8).collect()
}

fn write(root: &Path, relative: &str, content: &[u8]) {
    let path = root.join(relative);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create fixture dir");
    }
    std::fs::write(path, content).expect("write fixture");
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path();
    std::fs::write(base.join("secret.txt"), SECRET).expect("write secret");
    let root = base.join("root");

    write(&root, "index.html", b"<h1>home</h1>\n");
    write(&root, "hello.txt", HELLO.as_bytes());
    write(&root, "digits.txt", &digits());
    write(&root, "big.bin", &big());
    write(&root, "assets/app.js", APP_JS.as_bytes());
    write(&root, "assets/app.js.br", APP_JS_BR);
    write(&root, "assets/app.js.gz", APP_JS_GZ);
    write(&root, "assets/style.css", b"body { color: red }\n");
    write(&root, "assets/style.css.gz", STYLE_CSS_GZ);
    write(&root, "assets/deep/x.css", b"p {}\n");
    write(&root, "docs/index.html", b"<h1>docs</h1>\n");
    write(&root, "docs/page.html", b"<p>page</p>\n");
    write(&root, "docs/guide/chapter.txt", b"chapter\n");
    write(&root, ".env", SECRET.as_bytes());
    write(&root, ".git/config", SECRET.as_bytes());
    write(&root, "hot.txt", b"version one\n");
    std::os::unix::fs::symlink(base.join("secret.txt"), root.join("leak.txt")).expect("symlink");
    std::os::unix::fs::symlink(base, root.join("leakdir")).expect("symlink");
    std::os::unix::fs::symlink(root.join("hello.txt"), root.join("alias.txt")).expect("symlink");
    std::os::unix::fs::symlink(root.join(".env"), root.join("env-link.txt")).expect("symlink");

    let toml = r#"
[[listener]]
address = "127.0.0.1:0"

[[site]]
name = "test"
prefix = "/"
root = "root"
hot_file_max_bytes = 65536
hot_cache_bytes = 1048576

[[site.cache_control]]
pattern = "assets/**"
value = "public, max-age=31536000, immutable"

[[site.cache_control]]
pattern = "*.html"
value = "public, max-age=60"
"#;
    let config = edge_config::parse(toml, Path::new("test.toml"), base)
        .unwrap_or_else(|e| panic!("test config is valid: {e}"));
    let node = breakwater_edge::start(config).await.expect("node starts");
    let addr = node.listener_addrs()[0];

    Fixture {
        _dir: dir,
        _node: node,
        root,
        addr,
        client: reqwest::Client::new(),
    }
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII header"))
}

fn etag_of(response: &reqwest::Response) -> String {
    header(response, "etag").expect("etag present").to_owned()
}

async fn error_code(response: reqwest::Response) -> String {
    let bytes = response.bytes().await.expect("error body");
    let body: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON error body");
    body["error"]["code"]
        .as_str()
        .expect("error code")
        .to_owned()
}

#[tokio::test]
async fn full_get_carries_validators_type_and_length() {
    let f = start().await;
    let r = f.get("/hello.txt", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let etag = etag_of(&r);
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "strong etag: {etag}"
    );
    let modified = httpdate::parse_http_date(header(&r, "last-modified").expect("last-modified"))
        .expect("HTTP date");
    let on_disk = std::fs::metadata(f.root.join("hello.txt"))
        .and_then(|m| m.modified())
        .expect("mtime");
    assert!(on_disk.duration_since(modified).expect("not in the future") < Duration::from_secs(1));
    assert_eq!(
        header(&r, "content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(header(&r, "content-length"), Some("12"));
    assert_eq!(header(&r, "accept-ranges"), Some("bytes"));
    assert_eq!(
        header(&r, "cache-control"),
        None,
        "no rule matches hello.txt"
    );
    assert_eq!(header(&r, "vary"), None, "no compressed sibling");
    assert_eq!(header(&r, "content-encoding"), None);
    assert_eq!(r.text().await.expect("body"), HELLO);

    // A second GET of an unchanged file gives the same validator.
    assert_eq!(etag_of(&f.get("/hello.txt", &[]).await), etag);

    // An in-root symlink is fine; it is the same file.
    let r = f.get("/alias.txt", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.expect("body"), HELLO);

    let r = f.get("/data%20missing.json", &[]).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    assert_eq!(error_code(r).await, "not_found");
}

#[tokio::test]
async fn cache_control_follows_the_first_matching_rule() {
    let f = start().await;
    let immutable = Some("public, max-age=31536000, immutable");
    for (path, want) in [
        ("/index.html", Some("public, max-age=60")),
        ("/", Some("public, max-age=60")),
        ("/assets/style.css", immutable),
        ("/assets/deep/x.css", immutable),
        // `*` does not cross `/`: nested pages need `**/*.html`.
        ("/docs/page.html", None),
        ("/docs/", None),
        ("/digits.txt", None),
    ] {
        let r = f.get(path, &[]).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(header(&r, "cache-control"), want, "{path}");
    }
    let r = f.get("/assets/app.js", &[]).await;
    let content_type = header(&r, "content-type").expect("content-type");
    assert!(
        content_type.contains("javascript") && content_type.ends_with("; charset=utf-8"),
        "{content_type}"
    );
}

#[tokio::test]
async fn head_has_get_headers_and_no_body() {
    let f = start().await;
    let get = f.get("/assets/app.js", &[]).await;
    let head = f.request(Method::HEAD, "/assets/app.js", &[]).await;
    assert_eq!(head.status(), StatusCode::OK);
    for name in [
        "etag",
        "last-modified",
        "content-type",
        "content-length",
        "cache-control",
        "vary",
        "accept-ranges",
    ] {
        assert!(get.headers().get(name).is_some(), "GET has {name}");
        assert_eq!(get.headers().get(name), head.headers().get(name), "{name}");
    }
    assert_eq!(
        header(&head, "content-length"),
        Some(APP_JS.len().to_string().as_str())
    );
    assert!(head.bytes().await.expect("body").is_empty());

    // Range is defined for GET only: HEAD still describes the whole file.
    let head = f
        .request(Method::HEAD, "/big.bin", &[("range", "bytes=0-9")])
        .await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        header(&head, "content-length"),
        Some(BIG_LEN.to_string().as_str())
    );
    assert_eq!(header(&head, "content-range"), None);
}

#[tokio::test]
async fn other_methods_get_405_with_allow() {
    let f = start().await;
    for method in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
        let r = f.request(method.clone(), "/hello.txt", &[]).await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(header(&r, "allow"), Some("GET, HEAD"));
        assert_eq!(error_code(r).await, "method_not_allowed");
    }
}

#[tokio::test]
async fn if_none_match_and_if_modified_since_give_304() {
    let f = start().await;
    let first = f.get("/index.html", &[]).await;
    let etag = etag_of(&first);
    let last_modified = header(&first, "last-modified")
        .expect("last-modified")
        .to_owned();

    let weak = format!("W/{etag}");
    let list = format!("\"other\", {etag}, \"third\"");
    for inm in [etag.as_str(), weak.as_str(), list.as_str(), "*"] {
        let r = f.get("/index.html", &[("if-none-match", inm)]).await;
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED, "If-None-Match: {inm}");
        assert_eq!(header(&r, "etag"), Some(etag.as_str()));
        assert_eq!(header(&r, "cache-control"), Some("public, max-age=60"));
        assert_eq!(header(&r, "last-modified"), Some(last_modified.as_str()));
        assert!(r.bytes().await.expect("body").is_empty());
    }
    let r = f
        .get("/index.html", &[("if-none-match", "\"other\", W/\"nope\"")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);

    let r = f
        .get("/index.html", &[("if-modified-since", &last_modified)])
        .await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(header(&r, "etag"), Some(etag.as_str()));
    let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
    let r = f.get("/index.html", &[("if-modified-since", &later)]).await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let earlier = httpdate::fmt_http_date(
        httpdate::parse_http_date(&last_modified).expect("date") - Duration::from_secs(10),
    );
    let r = f
        .get("/index.html", &[("if-modified-since", &earlier)])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = f
        .get("/index.html", &[("if-modified-since", "not a date")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);

    // If-None-Match takes precedence: a miss there means 200 even though
    // the date alone would allow a 304.
    let r = f
        .get(
            "/index.html",
            &[
                ("if-none-match", "\"stale\""),
                ("if-modified-since", &last_modified),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);

    // 304 for a file with variants keeps Vary, so caches key correctly.
    let js = f.get("/assets/app.js", &[]).await;
    let r = f
        .get("/assets/app.js", &[("if-none-match", &etag_of(&js))])
        .await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(header(&r, "vary"), Some("accept-encoding"));
    assert_eq!(
        header(&r, "cache-control"),
        Some("public, max-age=31536000, immutable")
    );
}

#[tokio::test]
async fn single_suffix_and_open_ranges() {
    let f = start().await;
    let content = digits();
    for (range, start, end) in [
        ("bytes=0-9", 0, 9),
        ("bytes=-10", 90, 99),
        ("bytes=-500", 0, 99),
        ("bytes=95-", 95, 99),
        ("bytes=40-59", 40, 59),
        ("bytes=90-1000", 90, 99),
    ] {
        let r = f.get("/digits.txt", &[("range", range)]).await;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            header(&r, "content-range"),
            Some(format!("bytes {start}-{end}/100").as_str()),
            "{range}"
        );
        assert_eq!(
            header(&r, "content-type"),
            Some("text/plain; charset=utf-8")
        );
        let len = end - start + 1;
        assert_eq!(header(&r, "content-length"), Some(len.to_string().as_str()));
        assert_eq!(
            &r.bytes().await.expect("body")[..],
            &content[start..=end],
            "{range}"
        );
    }
}

#[tokio::test]
async fn unsatisfiable_and_malformed_ranges() {
    let f = start().await;
    for range in [
        "bytes=100-",
        "bytes=500-600",
        "bytes=-0",
        "bytes=100-200, 300-",
    ] {
        let r = f.get("/digits.txt", &[("range", range)]).await;
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(header(&r, "content-range"), Some("bytes */100"), "{range}");
        assert_eq!(error_code(r).await, "range_not_satisfiable");
    }
    for range in [
        "bytes=abc",
        "bytes=5-1",
        "lines=1-2",
        "bytes",
        "bytes=1-2-3",
        "bytes=0-1,x",
    ] {
        let r = f.get("/digits.txt", &[("range", range)]).await;
        assert_eq!(r.status(), StatusCode::OK, "malformed {range:?} is ignored");
        assert_eq!(header(&r, "content-range"), None);
        assert_eq!(r.bytes().await.expect("body").len(), 100);
    }
}

#[tokio::test]
async fn if_range_decides_between_partial_and_full() {
    let f = start().await;
    let first = f.get("/digits.txt", &[]).await;
    let etag = etag_of(&first);
    let last_modified = header(&first, "last-modified")
        .expect("last-modified")
        .to_owned();
    let weak = format!("W/{etag}");
    let old_date = httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(1));

    for (if_range, want) in [
        (etag.as_str(), StatusCode::PARTIAL_CONTENT),
        (last_modified.as_str(), StatusCode::PARTIAL_CONTENT),
        ("\"some-other-version\"", StatusCode::OK),
        (weak.as_str(), StatusCode::OK),
        (old_date.as_str(), StatusCode::OK),
    ] {
        let r = f
            .get(
                "/digits.txt",
                &[("range", "bytes=0-4"), ("if-range", if_range)],
            )
            .await;
        assert_eq!(r.status(), want, "If-Range: {if_range}");
        let body = r.bytes().await.expect("body");
        let want_len = if want == StatusCode::OK { 100 } else { 5 };
        assert_eq!(body.len(), want_len, "If-Range: {if_range}");
    }
}

struct Part {
    content_type: String,
    content_range: String,
    data: Vec<u8>,
}

fn boundary_of(response: &reqwest::Response) -> String {
    let content_type = header(response, "content-type").expect("content-type");
    let boundary = content_type
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap_or_else(|| panic!("not multipart: {content_type}"));
    boundary.to_owned()
}

/// A strict reader for `multipart/byteranges`: the body must be exactly a
/// sequence of delimited parts followed by the close delimiter.
fn parse_multipart(body: &[u8], boundary: &str) -> Vec<Part> {
    let delimiter = format!("--{boundary}");
    let mut rest = body
        .strip_prefix(b"\r\n".as_slice())
        .unwrap_or(body)
        .strip_prefix(delimiter.as_bytes())
        .expect("body starts with the boundary");
    let mut parts = Vec::new();
    loop {
        if rest.starts_with(b"--") {
            assert!(
                rest == b"--\r\n" || rest == b"--",
                "trailing bytes after close delimiter"
            );
            return parts;
        }
        rest = rest
            .strip_prefix(b"\r\n".as_slice())
            .expect("CRLF after boundary");
        let head_end = find(rest, b"\r\n\r\n").expect("part headers end");
        let head = std::str::from_utf8(&rest[..head_end]).expect("ASCII part headers");
        let mut content_type = String::new();
        let mut content_range = String::new();
        for line in head.split("\r\n") {
            let (name, value) = line.split_once(':').expect("header line");
            match name.trim().to_ascii_lowercase().as_str() {
                "content-type" => content_type = value.trim().to_owned(),
                "content-range" => content_range = value.trim().to_owned(),
                other => panic!("unexpected part header {other}"),
            }
        }
        rest = &rest[head_end + 4..];
        let next = format!("\r\n{delimiter}");
        let data_end = find(rest, next.as_bytes()).expect("part ends with a delimiter");
        parts.push(Part {
            content_type,
            content_range,
            data: rest[..data_end].to_vec(),
        });
        rest = &rest[data_end + next.len()..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test]
async fn multiple_ranges_are_multipart_and_coalesced() {
    let f = start().await;
    let content = digits();
    // 10-14 and 12-19 overlap and merge; 0-4 and -5 stay separate.
    let r = f
        .get("/digits.txt", &[("range", "bytes=10-14, 0-4, 12-19, -5")])
        .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    let boundary = boundary_of(&r);
    let declared: usize = header(&r, "content-length")
        .expect("content-length")
        .parse()
        .expect("number");
    let body = r.bytes().await.expect("body");
    assert_eq!(body.len(), declared);
    let parts = parse_multipart(&body, &boundary);
    let got: Vec<(&str, &[u8])> = parts
        .iter()
        .map(|p| (p.content_range.as_str(), p.data.as_slice()))
        .collect();
    assert_eq!(
        got,
        [
            ("bytes 0-4/100", &content[0..=4]),
            ("bytes 10-19/100", &content[10..=19]),
            ("bytes 95-99/100", &content[95..=99]),
        ]
    );
    assert!(
        parts
            .iter()
            .all(|p| p.content_type == "text/plain; charset=utf-8")
    );

    // Ranges that merge into one give a plain 206.
    let r = f.get("/digits.txt", &[("range", "bytes=0-9,5-14")]).await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&r, "content-range"), Some("bytes 0-14/100"));
}

#[tokio::test]
async fn large_files_stream_with_ranges() {
    let f = start().await;
    let content = big();

    let r = f.get("/big.bin", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "content-length"),
        Some(BIG_LEN.to_string().as_str())
    );
    assert_eq!(header(&r, "content-type"), Some("application/octet-stream"));
    let body = r.bytes().await.expect("body");
    assert!(body[..] == content[..], "full large body intact");

    for (range, start, end) in [
        ("bytes=1000-1999", 1000, 1999),
        ("bytes=-70000", BIG_LEN - 70000, BIG_LEN - 1),
        ("bytes=1048000-", 1_048_000, BIG_LEN - 1),
        ("bytes=65530-200000", 65530, 200_000),
    ] {
        let r = f.get("/big.bin", &[("range", range)]).await;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            header(&r, "content-range"),
            Some(format!("bytes {start}-{end}/{BIG_LEN}").as_str())
        );
        let body = r.bytes().await.expect("body");
        assert!(body[..] == content[start..=end], "{range} body");
    }

    let r = f
        .get(
            "/big.bin",
            &[("range", "bytes=900000-900099,10-19,500000-600000")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    let boundary = boundary_of(&r);
    let body = r.bytes().await.expect("body");
    let parts = parse_multipart(&body, &boundary);
    assert_eq!(parts.len(), 3);
    for (part, (start, end)) in parts
        .iter()
        .zip([(10, 19), (500_000, 600_000), (900_000, 900_099)])
    {
        assert_eq!(part.content_range, format!("bytes {start}-{end}/{BIG_LEN}"));
        assert_eq!(part.content_type, "application/octet-stream");
        assert!(part.data[..] == content[start..=end]);
    }

    let r = f.get("/big.bin", &[("range", "bytes=2000000-")]).await;
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        header(&r, "content-range"),
        Some(format!("bytes */{BIG_LEN}").as_str())
    );
}

#[tokio::test]
async fn precompressed_variants_by_accept_encoding() {
    let f = start().await;
    let cases: &[(Option<&str>, Option<&str>, &[u8])] = &[
        (None, None, APP_JS.as_bytes()),
        (Some("gzip, deflate, br"), Some("br"), APP_JS_BR),
        (Some("br"), Some("br"), APP_JS_BR),
        (Some("gzip"), Some("gzip"), APP_JS_GZ),
        (Some("br;q=0.5, gzip"), Some("gzip"), APP_JS_GZ),
        (Some("gzip;q=0.8, br;q=0.8"), Some("br"), APP_JS_BR),
        (Some("identity"), None, APP_JS.as_bytes()),
        (Some("br;q=0.9, identity"), None, APP_JS.as_bytes()),
        (Some("br;q=0, gzip;q=0"), None, APP_JS.as_bytes()),
        (Some("*"), Some("br"), APP_JS_BR),
        (Some("*;q=0.5, identity"), None, APP_JS.as_bytes()),
        (Some("identity;q=0, gzip"), Some("gzip"), APP_JS_GZ),
        (Some("deflate"), None, APP_JS.as_bytes()),
    ];
    let mut etags = std::collections::HashMap::new();
    for (accept, coding, body) in cases {
        let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("accept-encoding", *a)).collect();
        let r = f.get("/assets/app.js", &headers).await;
        assert_eq!(r.status(), StatusCode::OK, "{accept:?}");
        assert_eq!(header(&r, "content-encoding"), *coding, "{accept:?}");
        assert_eq!(header(&r, "vary"), Some("accept-encoding"), "{accept:?}");
        assert_eq!(
            header(&r, "content-length"),
            Some(body.len().to_string().as_str()),
            "{accept:?}"
        );
        assert!(header(&r, "content-type").is_some_and(|t| t.contains("javascript")));
        let etag = etag_of(&r);
        if let Some(previous) = etags.insert(*coding, etag.clone()) {
            assert_eq!(previous, etag, "one ETag per variant");
        }
        assert_eq!(&r.bytes().await.expect("body")[..], *body, "{accept:?}");
    }
    assert_eq!(etags.len(), 3);
    let distinct: std::collections::HashSet<_> = etags.values().collect();
    assert_eq!(distinct.len(), 3, "variants have distinct ETags: {etags:?}");

    // The identity ETag does not validate the br variant.
    let r = f
        .get(
            "/assets/app.js",
            &[("accept-encoding", "br"), ("if-none-match", &etags[&None])],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-encoding"), Some("br"));

    // Only a gzip sibling: br clients get identity, still with Vary.
    let r = f
        .get("/assets/style.css", &[("accept-encoding", "br")])
        .await;
    assert_eq!(header(&r, "content-encoding"), None);
    assert_eq!(header(&r, "vary"), Some("accept-encoding"));
    assert_eq!(header(&r, "content-type"), Some("text/css; charset=utf-8"));
    let r = f
        .get("/assets/style.css", &[("accept-encoding", "br, gzip")])
        .await;
    assert_eq!(header(&r, "content-encoding"), Some("gzip"));
    assert_eq!(header(&r, "content-type"), Some("text/css; charset=utf-8"));
    assert_eq!(&r.bytes().await.expect("body")[..], STYLE_CSS_GZ);

    // Ranges apply to the chosen variant.
    let r = f
        .get(
            "/assets/app.js",
            &[("accept-encoding", "br"), ("range", "bytes=0-2")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&r, "content-encoding"), Some("br"));
    assert_eq!(
        header(&r, "content-range"),
        Some(format!("bytes 0-2/{}", APP_JS_BR.len()).as_str())
    );
    assert_eq!(&r.bytes().await.expect("body")[..], &APP_JS_BR[..3]);

    // No siblings: no Vary, whatever the client accepts.
    let r = f
        .get("/hello.txt", &[("accept-encoding", "br, gzip")])
        .await;
    assert_eq!(header(&r, "content-encoding"), None);
    assert_eq!(header(&r, "vary"), None);
}

#[tokio::test]
async fn directories_redirect_and_serve_their_index() {
    let f = start().await;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = no_redirects
        .get(f.url("/docs"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(header(&r, "location"), Some("docs/"));
    let r = no_redirects
        .get(f.url("/docs/guide"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(header(&r, "location"), Some("guide/"));

    // Following the relative Location lands on the slash form.
    let r = f.get("/docs", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.url().path(), "/docs/");
    assert_eq!(r.text().await.expect("body"), "<h1>docs</h1>\n");

    let r = f.get("/", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(r.text().await.expect("body"), "<h1>home</h1>\n");

    // No index: no listing.
    let r = f.get("/docs/guide/", &[]).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "not_found");
    // A file asked for as a directory.
    let r = f.get("/hello.txt/", &[]).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn hidden_files_are_not_found() {
    let f = start().await;
    for path in [
        "/.env",
        "/.git/config",
        "/.git/",
        "/%2eenv",
        "/env-link.txt",
    ] {
        let r = f.get(path, &[]).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(!r.text().await.expect("body").contains(SECRET), "{path}");
    }
}

/// Sends `target` verbatim in the request line, which no HTTP client
/// library will do for `..` or backslashes.
async fn raw_get(addr: SocketAddr, target: &[u8]) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request = b"GET ".to_vec();
    request.extend_from_slice(target);
    request.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(&request).await.expect("write request");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("response within 10s")
        .expect("read response");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

#[tokio::test]
async fn traversal_attempts_never_leak() {
    let f = start().await;
    let attempts: &[&[u8]] = &[
        b"/../secret.txt",
        b"/%2e%2e/secret.txt",
        b"/%2E%2E/secret.txt",
        b"/.%2e/secret.txt",
        b"/%2e./secret.txt",
        b"/%2e%2e%2fsecret.txt",
        b"/..%2fsecret.txt",
        b"/..%2Fsecret.txt",
        b"/..%5csecret.txt",
        b"/%2e%2e%5csecret.txt",
        b"/%252e%252e/secret.txt",
        b"/%252e%252e%252fsecret.txt",
        b"/..\\secret.txt",
        b"/%c0%ae%c0%ae/secret.txt",
        b"/%c0%af../secret.txt",
        b"/assets/../../secret.txt",
        b"/assets/%2e%2e/%2e%2e/secret.txt",
        b"/./../secret.txt",
        b"/%00",
        b"/hello.txt%00.html",
        b"/%2fsecret.txt",
        b"/%2f..%2f..%2fsecret.txt",
        b"//../secret.txt",
        b"/%%32e%%32e/secret.txt",
        b"/leak.txt",
        b"/leakdir/secret.txt",
    ];
    assert!(attempts.len() >= 10);
    for target in attempts {
        let shown = String::from_utf8_lossy(target);
        let (status, response) = raw_get(f.addr, target).await;
        assert!((400..500).contains(&status), "{shown}: status {status}");
        assert!(!response.contains(SECRET), "{shown} leaked the secret");
    }

    // The lexical refusals say why, with a stable code.
    for target in [
        b"/%2e%2e/secret.txt".as_slice(),
        b"/%252e%252e/secret.txt",
        b"/%c0%ae%c0%ae/x",
    ] {
        let (status, response) = raw_get(f.addr, target).await;
        assert_eq!(status, 400);
        assert!(response.contains("\"bad_path\""), "{response}");
    }
    // Symlinks out of the root look like missing files.
    let (status, _) = raw_get(f.addr, b"/leak.txt").await;
    assert_eq!(status, 404);

    // The same server still serves the legitimate file.
    let (status, response) = raw_get(f.addr, b"/hello.txt").await;
    assert_eq!(status, 200);
    assert!(response.ends_with(HELLO));
}

#[tokio::test]
async fn edited_hot_files_are_never_served_stale() {
    let f = start().await;
    let path = f.root.join("hot.txt");

    let r = f.get("/hot.txt", &[]).await;
    let etag1 = etag_of(&r);
    assert_eq!(r.text().await.expect("body"), "version one\n");
    // Served again (now from memory), unchanged.
    let r = f.get("/hot.txt", &[]).await;
    assert_eq!(etag_of(&r), etag1);
    assert_eq!(r.text().await.expect("body"), "version one\n");

    // A different length.
    std::fs::write(&path, "version two, longer\n").expect("rewrite");
    let r = f.get("/hot.txt", &[]).await;
    let etag2 = etag_of(&r);
    assert_ne!(etag2, etag1);
    assert_eq!(r.text().await.expect("body"), "version two, longer\n");
    let r = f.get("/hot.txt", &[("if-none-match", &etag1)]).await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "old validator no longer matches"
    );

    // Same length, new mtime. The mtime is set explicitly because two
    // writes within one clock tick can share a timestamp.
    std::fs::write(&path, "version TWO, longer\n").expect("rewrite");
    let file = std::fs::File::options()
        .write(true)
        .open(&path)
        .expect("open");
    file.set_modified(SystemTime::now() + Duration::from_secs(5))
        .expect("set mtime");
    drop(file);
    let r = f.get("/hot.txt", &[]).await;
    assert_ne!(etag_of(&r), etag2);
    assert_eq!(r.text().await.expect("body"), "version TWO, longer\n");

    // Ranges over the cached copy follow the new content too.
    let r = f.get("/hot.txt", &[("range", "bytes=8-10")]).await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.text().await.expect("body"), "TWO");

    // Deleted: gone at once, not served from memory.
    std::fs::remove_file(&path).expect("remove");
    let r = f.get("/hot.txt", &[]).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn header_values_are_well_formed() {
    // Guards the exact wire form the rest of the node and caches rely on.
    let f = start().await;
    let r = f
        .get("/assets/app.js", &[("accept-encoding", "gzip")])
        .await;
    assert_eq!(
        r.headers().get(header::VARY),
        Some(&HeaderValue::from_static("accept-encoding"))
    );
    assert_eq!(
        r.headers().get(header::X_CONTENT_TYPE_OPTIONS),
        Some(&HeaderValue::from_static("nosniff"))
    );
    let etag = etag_of(&r);
    assert!(!etag.starts_with("W/"));
    assert!(etag.ends_with("-gz\""), "{etag}");
}
