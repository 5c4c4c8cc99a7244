//! A fake Kubernetes API server in the test process: list and watch over
//! HTTP/1 on 127.0.0.1, serving real Kubernetes JSON for Pods, Namespaces,
//! Nodes, Services, NetworkPolicies and EndpointSlices.
//!
//! It keeps one resource version counter, a log of watch events per
//! resource, and answers `?watch=true&resourceVersion=R` with the events
//! after `R` then every new one, as newline-delimited `WatchEvent`s
//! (ADDED, MODIFIED, DELETED, a BOOKMARK at the start, ERROR with a `410`
//! Status once the history is compacted). A test can end every open watch,
//! compact the history (open watches get `410 Gone`, and so does a watch
//! from an older version, forcing a relist) and take the server down (every
//! connection is dropped unanswered) and up again.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::stream;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Frame},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::watch;

/// The kinds served: (plural, list path, apiVersion, kind).
const RESOURCES: [(&str, &str, &str, &str); 6] = [
    ("pods", "/api/v1/pods", "v1", "Pod"),
    ("namespaces", "/api/v1/namespaces", "v1", "Namespace"),
    ("nodes", "/api/v1/nodes", "v1", "Node"),
    ("services", "/api/v1/services", "v1", "Service"),
    (
        "networkpolicies",
        "/apis/networking.k8s.io/v1/networkpolicies",
        "networking.k8s.io/v1",
        "NetworkPolicy",
    ),
    (
        "endpointslices",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "discovery.k8s.io/v1",
        "EndpointSlice",
    ),
];

#[derive(Debug, Default)]
struct Collection {
    /// Serialized objects (far smaller than `Value`s, so a big fake
    /// cluster does not blur the memory of the code under test).
    objects: BTreeMap<(String, String), Arc<str>>,
    /// `(resourceVersion, type, object)` of every change since `min_rv`.
    log: Vec<(u64, &'static str, String, Arc<str>)>,
    /// Watches from an older version get `410 Gone`.
    min_rv: u64,
    lists: usize,
    watches: usize,
    /// Lists answer `403 Forbidden` (the kind's store never becomes ready).
    fail_lists: bool,
}

#[derive(Debug, Default)]
struct Inner {
    rv: u64,
    collections: [Collection; 6],
}

/// Generations of the commands that reach open watches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Control {
    /// Bumped to end every open watch.
    end: u64,
    /// Bumped to send every open watch a `410 Gone` (then end it).
    expire: u64,
}

#[derive(Debug)]
struct Shared {
    /// Requests must carry `Authorization: Bearer <token>` when set.
    token: Option<String>,
    inner: Mutex<Inner>,
    /// The latest resource version, bumped by every change.
    changed: watch::Sender<u64>,
    control: watch::Sender<Control>,
    up: AtomicBool,
}

/// The server; stopped when dropped.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    scheme: &'static str,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
        // Open watches end with the server.
        self.shared.control.send_modify(|c| c.end += 1);
    }
}

fn resource_of_kind(kind: &str) -> usize {
    RESOURCES
        .iter()
        .position(|r| r.3 == kind)
        .unwrap_or_else(|| panic!("the fake API server does not serve {kind}"))
}

fn key(obj: &Value) -> (String, String) {
    let s = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    (s("/metadata/namespace"), s("/metadata/name"))
}

impl FakeApiServer {
    /// Binds 127.0.0.1 on a free port and serves plain HTTP, anyone
    /// allowed, until dropped.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake API server");
        Self::serve(listener, None, None)
    }

    /// Serves on `listener` until dropped: over TLS with `tls`, and only to
    /// requests bearing `token` when one is given (401 otherwise), as a
    /// real API server serves its service accounts.
    ///
    /// # Panics
    /// When the listener has no local address.
    #[must_use]
    pub fn serve(
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        token: Option<String>,
    ) -> Self {
        let addr = listener.local_addr().expect("its address");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let shared = Arc::new(Shared {
            token,
            inner: Mutex::new(Inner {
                rv: 1,
                ..Inner::default()
            }),
            changed: watch::channel(1).0,
            control: watch::channel(Control::default()).0,
            up: AtomicBool::new(true),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if !s.up.load(Ordering::SeqCst) {
                    // Down: the connection is dropped unanswered.
                    drop(stream);
                    continue;
                }
                let s = s.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => connection(s, stream).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                connection(s, stream).await;
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            scheme,
            shared,
            task,
        }
    }

    /// Writes a kubeconfig naming this server (no credentials) to a new
    /// temporary file and returns its path; the caller removes it.
    ///
    /// # Panics
    /// When the file cannot be written.
    #[must_use]
    pub fn kubeconfig(&self) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(crate::unique("netpol-kubeconfig-"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\n\
                 users: [{{name: u, user: {{}}}}]\n\
                 contexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\n\
                 current-context: c\n",
                self.url()
            ),
        )
        .expect("kubeconfig");
        path
    }

    /// `http://127.0.0.1:PORT` (`https://ADDR:PORT` over TLS).
    #[must_use]
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Creates or replaces an object (its `kind` says where), giving it
    /// the next resource version: a watch sees ADDED or MODIFIED.
    pub fn apply(&self, obj: Value) {
        self.apply_all(std::iter::once(obj));
    }

    /// [`Self::apply`] for many objects, with one wake-up of the watches.
    pub fn apply_all(&self, objs: impl IntoIterator<Item = Value>) {
        let rv = {
            let mut inner = self.shared.inner.lock().expect("fake state");
            for mut obj in objs {
                let kind = obj
                    .get("kind")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let r = resource_of_kind(&kind);
                inner.rv += 1;
                let rv = inner.rv;
                obj["apiVersion"] = json!(RESOURCES[r].2);
                obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                if obj.pointer("/metadata/uid").is_none() {
                    obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
                }
                let c = &mut inner.collections[r];
                let k = key(&obj);
                let text: Arc<str> = obj.to_string().into();
                let name = k.1.clone();
                let ty = if c.objects.insert(k, text.clone()).is_some() {
                    "MODIFIED"
                } else {
                    "ADDED"
                };
                c.log.push((rv, ty, name, text));
            }
            inner.rv
        };
        self.shared.changed.send_replace(rv);
    }

    /// Deletes an object; a watch sees DELETED. Returns whether it existed.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let r = resource_of_kind(kind);
        let rv = {
            let mut inner = self.shared.inner.lock().expect("fake state");
            inner.rv += 1;
            let rv = inner.rv;
            let c = &mut inner.collections[r];
            let Some(text) = c.objects.remove(&(namespace.to_owned(), name.to_owned())) else {
                return false;
            };
            let mut obj: Value = serde_json::from_str(&text).expect("stored JSON");
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            c.log
                .push((rv, "DELETED", name.to_owned(), obj.to_string().into()));
            rv
        };
        self.shared.changed.send_replace(rv);
        true
    }

    /// Ends every open watch, as the API server does at its timeout: the
    /// clients watch again from their last version.
    pub fn end_watches(&self) {
        self.shared.control.send_modify(|c| c.end += 1);
    }

    /// Compacts the history: open watches get an ERROR event with a `410
    /// Gone` Status, and so does any watch from an older version, so
    /// clients list again.
    pub fn expire_watches(&self) {
        {
            let mut inner = self.shared.inner.lock().expect("fake state");
            let rv = inner.rv;
            for c in &mut inner.collections {
                c.log.clear();
                c.min_rv = rv;
            }
        }
        self.shared.control.send_modify(|c| c.expire += 1);
    }

    /// Takes the server down (every connection, open or new, is dropped
    /// unanswered) or brings it back.
    pub fn set_reachable(&self, up: bool) {
        self.shared.up.store(up, Ordering::SeqCst);
        if !up {
            self.shared.control.send_modify(|c| c.end += 1);
        }
    }

    /// Makes the lists of a kind fail with `403 Forbidden` (missing RBAC;
    /// kube-rs retries a `503` internally for minutes), or succeed again.
    pub fn fail_lists(&self, kind: &str, fail: bool) {
        let mut inner = self.shared.inner.lock().expect("fake state");
        inner.collections[resource_of_kind(kind)].fail_lists = fail;
    }

    /// Every object served, each kind in name order.
    #[must_use]
    pub fn objects(&self) -> Vec<Value> {
        let inner = self.shared.inner.lock().expect("fake state");
        inner
            .collections
            .iter()
            .flat_map(|c| c.objects.values())
            .map(|t| serde_json::from_str(t).expect("stored JSON"))
            .collect()
    }

    /// Lists served for a kind (`Pod`, ...): a relist shows here.
    #[must_use]
    pub fn lists(&self, kind: &str) -> usize {
        let inner = self.shared.inner.lock().expect("fake state");
        inner.collections[resource_of_kind(kind)].lists
    }

    /// Watches started for a kind.
    #[must_use]
    pub fn watches(&self, kind: &str) -> usize {
        let inner = self.shared.inner.lock().expect("fake state");
        inner.collections[resource_of_kind(kind)].watches
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// Serves one connection (plain or TLS) until it closes.
async fn connection<S>(s: Arc<Shared>, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
        let s = s.clone();
        async move {
            let (parts, body) = req.into_parts();
            // Writes carry an object; reads nothing worth keeping.
            let body = match body.collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => Bytes::new(),
            };
            handle(&s, &Request::from_parts(parts, body))
        }
    });
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

/// The server is down: hyper drops the connection.
#[derive(Debug)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the fake API server is down")
    }
}

impl std::error::Error for Refused {}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `metadata.name=X` (the one field selector the agent uses).
fn name_filter(query: &BTreeMap<String, String>) -> Option<String> {
    query
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name="))
        .map(str::to_owned)
}

fn handle(s: &Arc<Shared>, req: &Request<Bytes>) -> Result<Response<Body>, Refused> {
    if !s.up.load(Ordering::SeqCst) {
        return Err(Refused);
    }
    if let Some(token) = &s.token {
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if bearer != Some(token.as_str()) {
            return Ok(json_response(
                StatusCode::UNAUTHORIZED,
                &status(401, "Unauthorized", "Unauthorized"),
            ));
        }
    }
    let path = req.uri().path();
    if req.method() != hyper::Method::GET {
        return Ok(write(s, req));
    }
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    if path == "/version" {
        return Ok(json_response(
            StatusCode::OK,
            &json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake",
                "gitCommit": "", "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z",
                "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"
            }),
        ));
    }
    let Some(r) = RESOURCES.iter().position(|res| res.1 == path) else {
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", &format!("the fake serves no {path}")),
        ));
    };
    let filter = name_filter(&query);
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if !watching {
        let mut inner = s.inner.lock().expect("fake state");
        let rv = inner.rv;
        let c = &mut inner.collections[r];
        c.lists += 1;
        if c.fail_lists {
            return Ok(json_response(
                StatusCode::FORBIDDEN,
                &status(403, "Forbidden", "lists of this kind are forbidden (RBAC)"),
            ));
        }
        // Pages of `limit` objects, as the API server pages (kube-rs asks
        // for 500); the continue token is the last key served, so a page
        // costs its own objects, not the collection's (a 100,000-pod list
        // would otherwise be quadratic).
        let limit: usize = query
            .get("limit")
            .and_then(|v| v.parse().ok())
            .filter(|&l| l > 0)
            .unwrap_or(usize::MAX);
        let after: Option<(String, String)> = query
            .get("continue")
            .and_then(|v| v.split_once('/'))
            .map(|(ns, name)| (ns.to_owned(), name.to_owned()));
        let from = match &after {
            Some(k) => std::ops::Bound::Excluded(k.clone()),
            None => std::ops::Bound::Unbounded,
        };
        let mut matching = c
            .objects
            .range((from, std::ops::Bound::Unbounded))
            .filter(|(k, _)| filter.as_deref().is_none_or(|n| k.1 == n));
        let page: Vec<(&(String, String), &Arc<str>)> = matching.by_ref().take(limit).collect();
        let cont = match (page.last(), matching.next()) {
            (Some(((ns, name), _)), Some(_)) => format!(",\"continue\":\"{ns}/{name}\""),
            _ => String::new(),
        };
        let page = page.into_iter().map(|(_, v)| v);
        let mut body = format!(
            "{{\"apiVersion\":\"{}\",\"kind\":\"{}List\",\"metadata\":{{\"resourceVersion\":\"{rv}\"{cont}}},\"items\":[",
            RESOURCES[r].2, RESOURCES[r].3
        );
        for (i, item) in page.enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(item);
        }
        body.push_str("]}");
        let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        return Ok(resp);
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (gone, current) = {
        let mut inner = s.inner.lock().expect("fake state");
        let rv = inner.rv;
        let c = &mut inner.collections[r];
        c.watches += 1;
        (from < c.min_rv, rv)
    };
    let mut pending = VecDeque::new();
    let mut done = false;
    if gone {
        pending.push_back(gone_event(from));
        done = true;
    } else if query.get("allowWatchBookmarks").map(String::as_str) == Some("true") {
        pending.push_back(line(&json!({
            "type": "BOOKMARK",
            "object": {
                "kind": RESOURCES[r].3, "apiVersion": RESOURCES[r].2,
                "metadata": {"resourceVersion": from.max(1).min(current).to_string()}
            }
        })));
    }
    let state = WatchState {
        shared: s.clone(),
        resource: r,
        cursor: from,
        filter,
        changed: s.changed.subscribe(),
        control: s.control.subscribe(),
        start: *s.control.borrow(),
        pending,
        done,
    };
    let body = StreamBody::new(stream::unfold(state, next_frame));
    let mut resp = Response::new(body.boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// Where a write goes: the resource, the namespace, and the object's
/// name (none for a create, which POSTs to the collection).
fn write_target(path: &str) -> Option<(usize, String, Option<String>)> {
    let rest = path
        .strip_prefix("/api/v1/")
        .map(|r| ("v1", r))
        .or_else(|| {
            let r = path.strip_prefix("/apis/")?;
            let mut parts = r.splitn(3, '/');
            let (group, version, rest) = (parts.next()?, parts.next()?, parts.next()?);
            let api = RESOURCES
                .iter()
                .find(|res| res.2 == format!("{group}/{version}"))?
                .2;
            Some((api, rest))
        })?;
    let (api, rest) = rest;
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let (ns, plural, name) = match segs.as_slice() {
        ["namespaces", ns, plural] => (*ns, *plural, None),
        ["namespaces", ns, plural, name] => (*ns, *plural, Some(*name)),
        [plural] => ("", *plural, None),
        [plural, name] => ("", *plural, Some(*name)),
        _ => return None,
    };
    let r = RESOURCES
        .iter()
        .position(|res| res.0 == plural && res.2 == api)?;
    Some((r, ns.to_owned(), name.map(str::to_owned)))
}

/// POST (create), PUT (replace) and DELETE, answered as the API server
/// answers them, each feeding the watches.
fn write(s: &Arc<Shared>, req: &Request<Bytes>) -> Response<Body> {
    let path = req.uri().path();
    let Some((r, ns, name)) = write_target(path) else {
        return json_response(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", &format!("the fake serves no {path}")),
        );
    };
    let (_, _, api_version, kind) = RESOURCES[r];
    let method = req.method().clone();
    let mut inner = s.inner.lock().expect("fake state");
    let stored = |inner: &Inner, k: &(String, String)| inner.collections[r].objects.get(k).cloned();
    let response = match (&method, name) {
        (&hyper::Method::POST, None) | (&hyper::Method::PUT, Some(_)) => {
            let mut obj: Value = match serde_json::from_slice(req.body()) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        &status(400, "BadRequest", "the body is not a JSON object"),
                    );
                }
            };
            if !ns.is_empty() {
                obj["metadata"]["namespace"] = json!(ns);
            }
            let k = key(&obj);
            if k.1.is_empty() {
                return json_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &status(422, "Invalid", "metadata.name: Required value"),
                );
            }
            let exists = stored(&inner, &k).is_some();
            let create = method == hyper::Method::POST;
            if create && exists {
                return json_response(
                    StatusCode::CONFLICT,
                    &status(
                        409,
                        "AlreadyExists",
                        &format!("{kind} \"{}\" already exists", k.1),
                    ),
                );
            }
            if !create && !exists {
                return json_response(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", &format!("{kind} \"{}\" not found", k.1)),
                );
            }
            inner.rv += 1;
            let rv = inner.rv;
            obj["apiVersion"] = json!(api_version);
            obj["kind"] = json!(kind);
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            if obj.pointer("/metadata/uid").is_none() {
                obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
            }
            let text: Arc<str> = obj.to_string().into();
            let c = &mut inner.collections[r];
            c.objects.insert(k.clone(), text.clone());
            c.log
                .push((rv, if create { "ADDED" } else { "MODIFIED" }, k.1, text));
            let code = if create {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (json_response(code, &obj), Some(rv))
        }
        (&hyper::Method::DELETE, Some(name)) => {
            let k = (ns, name.clone());
            match inner.collections[r].objects.remove(&k) {
                None => (
                    json_response(
                        StatusCode::NOT_FOUND,
                        &status(404, "NotFound", &format!("{kind} \"{name}\" not found")),
                    ),
                    None,
                ),
                Some(text) => {
                    inner.rv += 1;
                    let rv = inner.rv;
                    let mut obj: Value = serde_json::from_str(&text).expect("stored JSON");
                    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                    inner.collections[r]
                        .log
                        .push((rv, "DELETED", name, obj.to_string().into()));
                    (json_response(StatusCode::OK, &obj), Some(rv))
                }
            }
        }
        _ => (
            json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &status(405, "MethodNotAllowed", &format!("{method} {path}")),
            ),
            None,
        ),
    };
    drop(inner);
    if let Some(rv) = response.1 {
        s.changed.send_replace(rv);
    }
    response.0
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

fn gone_event(from: u64) -> Bytes {
    line(&json!({
        "type": "ERROR",
        "object": status(410, "Expired", &format!("too old resource version: {from}")),
    }))
}

struct WatchState {
    shared: Arc<Shared>,
    resource: usize,
    cursor: u64,
    filter: Option<String>,
    changed: watch::Receiver<u64>,
    control: watch::Receiver<Control>,
    start: Control,
    pending: VecDeque<Bytes>,
    done: bool,
}

type Item = Result<Frame<Bytes>, Infallible>;

async fn next_frame(mut st: WatchState) -> Option<(Item, WatchState)> {
    loop {
        if let Some(b) = st.pending.pop_front() {
            return Some((Ok(Frame::data(b)), st));
        }
        if st.done {
            return None;
        }
        // Marked seen before reading the state: a change after this wakes
        // the wait below.
        let control = *st.control.borrow_and_update();
        st.changed.borrow_and_update();
        if control.expire != st.start.expire {
            st.pending.push_back(gone_event(st.cursor));
            st.done = true;
            continue;
        }
        if control.end != st.start.end || !st.shared.up.load(Ordering::SeqCst) {
            return None;
        }
        {
            let inner = st.shared.inner.lock().expect("fake state");
            let c = &inner.collections[st.resource];
            let from = st.cursor;
            for (rv, ty, name, obj) in c.log.iter().filter(|e| e.0 > from) {
                if st.filter.as_deref().is_none_or(|n| name == n) {
                    st.pending.push_back(Bytes::from(format!(
                        "{{\"type\":\"{ty}\",\"object\":{obj}}}\n"
                    )));
                }
                st.cursor = *rv;
            }
        }
        if !st.pending.is_empty() {
            continue;
        }
        tokio::select! {
            r = st.changed.changed() => if r.is_err() { return None },
            r = st.control.changed() => if r.is_err() { return None },
        }
    }
}
