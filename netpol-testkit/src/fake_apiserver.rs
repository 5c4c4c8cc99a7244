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

use crate::resources::{RESOURCES, Resource, resource_of_kind};
pub use crate::resources::{collection_path, object_path, serves};

/// `(namespace, name)`; the namespace empty for cluster-scoped kinds.
type Key = (String, String);

#[derive(Debug, Default)]
struct Collection {
    /// Serialized objects (far smaller than `Value`s, so a big fake
    /// cluster does not blur the memory of the code under test).
    objects: BTreeMap<Key, Arc<str>>,
    /// `(resourceVersion, type, object)` of every change since `min_rv`.
    log: Vec<(u64, &'static str, Key, Arc<str>)>,
    /// Watches from an older version get `410 Gone`.
    min_rv: u64,
    lists: usize,
    watches: usize,
    /// Lists answer `403 Forbidden` (the kind's store never becomes ready).
    fail_lists: bool,
    /// Reads answer `404 Not Found`, as for a kind whose CRD is not
    /// installed.
    not_served: bool,
}

#[derive(Debug, Default)]
struct Inner {
    rv: u64,
    collections: [Collection; RESOURCES.len()],
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
                obj["apiVersion"] = json!(RESOURCES[r].api_version);
                obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                if obj.pointer("/metadata/uid").is_none() {
                    obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
                }
                let c = &mut inner.collections[r];
                let k = key(&obj);
                let text: Arc<str> = obj.to_string().into();
                let ty = if c.objects.insert(k.clone(), text.clone()).is_some() {
                    "MODIFIED"
                } else {
                    "ADDED"
                };
                c.log.push((rv, ty, k, text));
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
            c.log.push((
                rv,
                "DELETED",
                (namespace.to_owned(), name.to_owned()),
                obj.to_string().into(),
            ));
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

    /// Makes the reads of a kind answer `404 Not Found`, as an API server
    /// without its CRD does, or serves it again.
    pub fn set_served(&self, kind: &str, served: bool) {
        let mut inner = self.shared.inner.lock().expect("fake state");
        inner.collections[resource_of_kind(kind)].not_served = !served;
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
    if let Some(body) = discovery(path) {
        return Ok(json_response(StatusCode::OK, &body));
    }
    let Some((r, ns, name)) = target(path) else {
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", &format!("the fake serves no {path}")),
        ));
    };
    if s.inner.lock().expect("fake state").collections[r].not_served {
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        ));
    }
    if let Some(name) = name {
        let inner = s.inner.lock().expect("fake state");
        return Ok(
            match inner.collections[r].objects.get(&(ns, name.clone())) {
                Some(text) => {
                    let mut resp = Response::new(Full::new(Bytes::from(text.to_string())).boxed());
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/json"),
                    );
                    resp
                }
                None => not_found(r, &name),
            },
        );
    }
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
            .filter(|(k, _)| {
                (ns.is_empty() || k.0 == ns) && filter.as_deref().is_none_or(|n| k.1 == n)
            });
        let page: Vec<(&(String, String), &Arc<str>)> = matching.by_ref().take(limit).collect();
        let cont = match (page.last(), matching.next()) {
            (Some(((ns, name), _)), Some(_)) => format!(",\"continue\":\"{ns}/{name}\""),
            _ => String::new(),
        };
        let page = page.into_iter().map(|(_, v)| v);
        let mut body = format!(
            "{{\"apiVersion\":\"{}\",\"kind\":\"{}List\",\"metadata\":{{\"resourceVersion\":\"{rv}\"{cont}}},\"items\":[",
            RESOURCES[r].api_version, RESOURCES[r].kind
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
        // A version never issued is one a server restarted without its
        // objects issued (the binary's history is in memory): too old
        // for this one, so the client lists again.
        (from < c.min_rv || from > rv, rv)
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
                "kind": RESOURCES[r].kind, "apiVersion": RESOURCES[r].api_version,
                "metadata": {"resourceVersion": from.max(1).min(current).to_string()}
            }
        })));
    }
    let state = WatchState {
        shared: s.clone(),
        resource: r,
        cursor: from,
        namespace: ns,
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

/// What a path names: the resource, the namespace (empty for every
/// namespace's collection and for cluster-scoped kinds), and the object's
/// name (none for the collection: a list, a watch or a create). A
/// namespaced kind's object is only found in its namespace, a
/// cluster-scoped one's never in one, as the API server routes them.
fn target(path: &str) -> Option<(usize, String, Option<String>)> {
    let (api, rest) = path
        .strip_prefix("/api/v1/")
        .map(|r| ("v1".to_owned(), r))
        .or_else(|| {
            let mut parts = path.strip_prefix("/apis/")?.splitn(3, '/');
            let (group, version, rest) = (parts.next()?, parts.next()?, parts.next()?);
            Some((format!("{group}/{version}"), rest))
        })?;
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
        .position(|res| res.plural == plural && res.api_version == api)?;
    let namespaced = RESOURCES[r].namespaced;
    if (!namespaced && !ns.is_empty()) || (namespaced && ns.is_empty() && name.is_some()) {
        return None;
    }
    Some((r, ns.to_owned(), name.map(str::to_owned)))
}

/// The discovery documents kubectl reads to map kinds to paths: the
/// legacy ones (`APIVersions`, `APIGroupList`, `APIResourceList`); a
/// client asking for the aggregated form gets these and falls back, as it
/// does with an older API server.
fn discovery(path: &str) -> Option<Value> {
    let group_versions = || {
        let mut gvs: Vec<&str> = RESOURCES
            .iter()
            .map(|r| r.api_version)
            .filter(|v| v.contains('/'))
            .collect();
        gvs.dedup();
        gvs
    };
    let group = |gv: &str| {
        let (name, version) = gv.split_once('/').unwrap_or((gv, ""));
        let v = json!({"groupVersion": gv, "version": version});
        json!({"name": name, "versions": [v.clone()], "preferredVersion": v})
    };
    match path.trim_end_matches('/') {
        "/openapi/v3" => Some(json!({"paths": RESOURCES
            .iter()
            .map(|r| {
                let gv = r.prefix().trim_start_matches('/').to_owned();
                let url = format!("/openapi/v3/{gv}");
                (gv, json!({"serverRelativeURL": url}))
            })
            .collect::<serde_json::Map<_, _>>()})),
        p if p.starts_with("/openapi/v3/") => openapi_v3(&p["/openapi/v3".len()..]),
        "/api" => Some(json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": []})),
        "/apis" => Some(json!({"kind": "APIGroupList", "apiVersion": "v1",
            "groups": group_versions().into_iter().map(group).collect::<Vec<_>>()})),
        p => {
            let gv = match p.strip_prefix("/api/") {
                Some(v) => v.to_owned(),
                None => {
                    let g = p.strip_prefix("/apis/")?;
                    if let Some(gv) = group_versions()
                        .into_iter()
                        .find(|gv| gv.starts_with(&format!("{g}/")))
                    {
                        let mut doc = group(gv);
                        doc["kind"] = json!("APIGroup");
                        doc["apiVersion"] = json!("v1");
                        return Some(doc);
                    }
                    g.to_owned()
                }
            };
            let resources: Vec<Value> = RESOURCES
                .iter()
                .filter(|r| r.api_version == gv)
                .map(|r| {
                    json!({"name": r.plural, "singularName": r.singular,
                        "namespaced": r.namespaced, "kind": r.kind, "shortNames": r.short_names,
                        "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
                })
                .collect();
            (!resources.is_empty()).then(|| {
                json!({"kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": gv, "resources": resources})
            })
        }
    }
}

/// The OpenAPI v3 document of a group version (`/apis/G/V`), as far as
/// kubectl reads it before a write: each kind's PATCH operation names the
/// `fieldValidation` parameter, so kubectl leaves validation to the
/// server (which only parses) instead of downloading schemas the fake
/// does not have.
fn openapi_v3(prefix: &str) -> Option<Value> {
    let paths: serde_json::Map<String, Value> = RESOURCES
        .iter()
        .filter(|r| r.prefix() == prefix)
        .map(|r| {
            let (group, version) = r.api_version.split_once('/').unwrap_or(("", r.api_version));
            let path = format!("{}/{{name}}", r.collection(if r.namespaced { "{namespace}" } else { "" }));
            let patch = json!({
                "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": r.kind},
                "parameters": [{"name": "fieldValidation", "in": "query",
                                "schema": {"type": "string", "uniqueItems": true}}],
                "responses": {}
            });
            (path, json!({"patch": patch}))
        })
        .collect();
    (!paths.is_empty()).then(|| {
        json!({"openapi": "3.0.0", "info": {"title": "netpol fake API server", "version": "v1"},
               "paths": paths, "components": {"schemas": {}}})
    })
}

fn not_found(r: usize, name: &str) -> Response<Body> {
    let res = &RESOURCES[r];
    let group = res.api_version.split_once('/').map_or("", |(g, _)| g);
    let mut body = status(
        404,
        "NotFound",
        &format!("{}.{group} \"{name}\" not found", res.plural),
    );
    body["details"] = json!({"name": name, "group": group, "kind": res.plural});
    json_response(StatusCode::NOT_FOUND, &body)
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes,
/// anything else replaces. A strategic merge patch (kubectl's) is applied
/// the same way with its `$` directives dropped: right for maps and for
/// lists without a merge key (all of a NetworkPolicy's), wrong for lists
/// merged by key (a Pod's containers), which it replaces.
/// RFC 6902: `add`, `remove`, `replace`, `move`, `copy` and `test`, in
/// order, all or nothing (the caller keeps the stored object on error).
fn apply_json_patch(target: &mut Value, ops: &[Value]) -> Result<(), String> {
    let mut out = target.clone();
    for (i, op) in ops.iter().enumerate() {
        let path = op["path"]
            .as_str()
            .ok_or(format!("operation {i}: no path"))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or(format!("operation {i}: no value"))
        };
        let from = || op["from"].as_str().ok_or(format!("operation {i}: no from"));
        match op["op"].as_str() {
            Some("add") => pointer_add(&mut out, path, value()?)?,
            Some("remove") => {
                pointer_remove(&mut out, path)?;
            }
            Some("replace") => {
                pointer_remove(&mut out, path)?;
                pointer_add(&mut out, path, value()?)?;
            }
            Some("move") => {
                let v = pointer_remove(&mut out, from()?)?;
                pointer_add(&mut out, path, v)?;
            }
            Some("copy") => {
                let v = out
                    .pointer(from()?)
                    .cloned()
                    .ok_or(format!("operation {i}: nothing at {}", from()?))?;
                pointer_add(&mut out, path, v)?;
            }
            Some("test") => {
                if out.pointer(path) != Some(&value()?) {
                    return Err(format!("operation {i}: test of {path} failed"));
                }
            }
            other => return Err(format!("operation {i}: unknown op {other:?}")),
        }
    }
    *target = out;
    Ok(())
}

/// A JSON pointer's parent and its last token, unescaped.
fn split_pointer(path: &str) -> Result<(&str, String), String> {
    let (parent, last) = path
        .rsplit_once('/')
        .ok_or(format!("{path:?} is not a JSON pointer"))?;
    Ok((parent, last.replace("~1", "/").replace("~0", "~")))
}

fn pointer_add(target: &mut Value, path: &str, v: Value) -> Result<(), String> {
    if path.is_empty() {
        *target = v;
        return Ok(());
    }
    let (parent, key) = split_pointer(path)?;
    match target.pointer_mut(parent) {
        Some(Value::Object(m)) => {
            m.insert(key, v);
            Ok(())
        }
        Some(Value::Array(a)) => {
            let at = if key == "-" {
                a.len()
            } else {
                key.parse::<usize>()
                    .ok()
                    .filter(|i| *i <= a.len())
                    .ok_or(format!("{path}: no index {key}"))?
            };
            a.insert(at, v);
            Ok(())
        }
        _ => Err(format!("{path}: no object or array at {parent:?}")),
    }
}

fn pointer_remove(target: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, key) = split_pointer(path)?;
    let removed = match target.pointer_mut(parent) {
        Some(Value::Object(m)) => m.remove(&key),
        Some(Value::Array(a)) => key
            .parse::<usize>()
            .ok()
            .filter(|i| *i < a.len())
            .map(|i| a.remove(i)),
        _ => None,
    };
    removed.ok_or(format!("{path}: nothing to remove"))
}

fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Value::Object(t) = target else {
        return;
    };
    for (k, v) in patch {
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// POST (create), PUT (replace), PATCH (merge) and DELETE, answered as
/// the API server answers them, each feeding the watches.
fn write(s: &Arc<Shared>, req: &Request<Bytes>) -> Response<Body> {
    let path = req.uri().path();
    let Some((r, ns, name)) = target(path) else {
        return json_response(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", &format!("the fake serves no {path}")),
        );
    };
    let Resource {
        api_version, kind, ..
    } = RESOURCES[r];
    let method = req.method().clone();
    let bad =
        |message: &str| json_response(StatusCode::BAD_REQUEST, &status(400, "BadRequest", message));
    let body: Option<Value> = match serde_json::from_slice(req.body()) {
        Ok(v @ Value::Object(_)) => Some(v),
        _ => None,
    };
    let mut inner = s.inner.lock().expect("fake state");
    let (mut obj, ty, code) = match (&method, name.clone()) {
        (&hyper::Method::POST, None) | (&hyper::Method::PUT, Some(_)) => {
            let Some(mut obj) = body else {
                return bad("the body is not a JSON object");
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
            let stored = inner.collections[r].objects.get(&k).cloned();
            let create = method == hyper::Method::POST;
            match (create, stored) {
                (true, Some(_)) => {
                    let group = api_version.split_once('/').map_or("", |(g, _)| g);
                    let plural = RESOURCES[r].plural;
                    let mut body = status(
                        409,
                        "AlreadyExists",
                        &format!("{plural}.{group} \"{}\" already exists", k.1),
                    );
                    body["details"] = json!({"name": k.1, "group": group, "kind": plural});
                    return json_response(StatusCode::CONFLICT, &body);
                }
                (false, None) => return not_found(r, &k.1),
                (false, Some(old)) => {
                    if name.as_deref() != Some(k.1.as_str()) {
                        return bad("the name of the object does not match the name on the URL");
                    }
                    // Optimistic concurrency: a replace naming a version
                    // must name the current one.
                    let old: Value = serde_json::from_str(&old).expect("stored JSON");
                    let theirs = obj
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str);
                    let ours = old
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str);
                    if theirs.is_some_and(|v| !v.is_empty() && Some(v) != ours) {
                        return json_response(
                            StatusCode::CONFLICT,
                            &status(
                                409,
                                "Conflict",
                                &format!(
                                    "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                                    RESOURCES[r].plural, k.1
                                ),
                            ),
                        );
                    }
                    // What the server set on create outlives a replace.
                    for field in ["uid", "creationTimestamp"] {
                        obj["metadata"][field] = old["metadata"][field].clone();
                    }
                    (obj, "MODIFIED", StatusCode::OK)
                }
                (true, None) => {
                    obj["metadata"]["creationTimestamp"] = json!(now());
                    (obj, "ADDED", StatusCode::CREATED)
                }
            }
        }
        (&hyper::Method::PATCH, Some(name)) => {
            let content_type = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let json_patch = content_type == "application/json-patch+json";
            if !json_patch
                && !matches!(
                    content_type,
                    "application/merge-patch+json" | "application/strategic-merge-patch+json"
                )
            {
                return json_response(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    &status(
                        415,
                        "UnsupportedMediaType",
                        &format!(
                            "the fake applies JSON, merge and strategic merge patches, not \
                             {content_type}"
                        ),
                    ),
                );
            }
            let Some(old) = inner.collections[r]
                .objects
                .get(&(ns.clone(), name.clone()))
            else {
                return not_found(r, &name);
            };
            let mut obj: Value = serde_json::from_str(old).expect("stored JSON");
            let metadata = obj["metadata"].clone();
            if json_patch {
                let ops = match serde_json::from_slice::<Value>(req.body()) {
                    Ok(Value::Array(ops)) => ops,
                    _ => return bad("a JSON patch is an array of operations"),
                };
                if let Err(e) = apply_json_patch(&mut obj, &ops) {
                    return json_response(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        &status(422, "Invalid", &format!("the JSON patch: {e}")),
                    );
                }
            } else {
                let Some(patch) = body else {
                    return bad("the patch is not a JSON object");
                };
                merge_patch(&mut obj, &patch);
            }
            // A patch changes neither the object's identity nor its kind.
            for field in ["name", "namespace", "uid"] {
                obj["metadata"][field] = metadata[field].clone();
            }
            (obj, "MODIFIED", StatusCode::OK)
        }
        (&hyper::Method::DELETE, Some(name)) => {
            let Some(text) = inner.collections[r].objects.remove(&(ns, name.clone())) else {
                return not_found(r, &name);
            };
            let obj: Value = serde_json::from_str(&text).expect("stored JSON");
            (obj, "DELETED", StatusCode::OK)
        }
        _ => {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &status(405, "MethodNotAllowed", &format!("{method} {path}")),
            );
        }
    };
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    // The API server decodes what it is sent into the kind's type before
    // storing it; what does not decode never reaches a watch.
    if ty != "DELETED"
        && let Err(e) = decodes(kind, &obj)
    {
        return bad(&format!(
            "{kind} in version \"{}\" cannot be handled as a {kind}: {e}",
            api_version.rsplit('/').next().unwrap_or(api_version)
        ));
    }
    inner.rv += 1;
    let rv = inner.rv;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    if obj.pointer("/metadata/uid").is_none_or(Value::is_null) {
        obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
    }
    let k = key(&obj);
    let text: Arc<str> = obj.to_string().into();
    let c = &mut inner.collections[r];
    if ty != "DELETED" {
        c.objects.insert(k.clone(), text.clone());
    }
    c.log.push((rv, ty, k, text));
    drop(inner);
    s.changed.send_replace(rv);
    json_response(code, &obj)
}

/// Whether `obj` decodes as the served `kind`'s type: a label value that
/// is not a string, a port that is not a number, are refused (400), as
/// the API server refuses them.
fn decodes(kind: &str, obj: &Value) -> Result<(), serde_json::Error> {
    use k8s_openapi::api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    };
    let v = obj.clone();
    match kind {
        "Pod" => serde_json::from_value::<Pod>(v).map(drop),
        "Namespace" => serde_json::from_value::<Namespace>(v).map(drop),
        "Node" => serde_json::from_value::<Node>(v).map(drop),
        "Service" => serde_json::from_value::<Service>(v).map(drop),
        "NetworkPolicy" => serde_json::from_value::<NetworkPolicy>(v).map(drop),
        "EndpointSlice" => serde_json::from_value::<EndpointSlice>(v).map(drop),
        _ => Ok(()),
    }
}

/// Now, as Kubernetes writes a time (RFC 3339, whole seconds, UTC).
fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
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
    /// Every namespace's when empty.
    namespace: String,
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
            for (rv, ty, (ns, name), obj) in c.log.iter().filter(|e| e.0 > from) {
                if (st.namespace.is_empty() || *ns == st.namespace)
                    && st.filter.as_deref().is_none_or(|n| name == n)
                {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_patches_apply_in_order_all_or_nothing() {
        let mut v = json!({"metadata": {"labels": {"a/b": "1"}}, "spec": {"ports": [80, 81]}});
        let ops = json!([
            {"op": "test", "path": "/metadata/labels/a~1b", "value": "1"},
            {"op": "replace", "path": "/metadata/labels/a~1b", "value": "2"},
            {"op": "add", "path": "/spec/ports/-", "value": 82},
            {"op": "add", "path": "/spec/ports/0", "value": 79},
            {"op": "remove", "path": "/spec/ports/1"},
            {"op": "copy", "from": "/spec/ports", "path": "/spec/copy"},
            {"op": "move", "from": "/spec/copy", "path": "/moved"},
        ]);
        apply_json_patch(&mut v, ops.as_array().expect("ops")).expect("applies");
        assert_eq!(
            v,
            json!({"metadata": {"labels": {"a/b": "2"}},
                   "spec": {"ports": [79, 81, 82]}, "moved": [79, 81, 82]})
        );
        let before = v.clone();
        let failing = json!([
            {"op": "replace", "path": "/moved", "value": []},
            {"op": "test", "path": "/spec/ports/0", "value": 80},
        ]);
        let e = apply_json_patch(&mut v, failing.as_array().expect("ops")).expect_err("refused");
        assert!(e.contains("test of /spec/ports/0 failed"), "{e}");
        assert_eq!(v, before, "nothing applied");
        for bad in [
            json!([{"op": "remove", "path": "/nothing"}]),
            json!([{"op": "add", "path": "/spec/ports/9", "value": 1}]),
            json!([{"op": "frobnicate", "path": "/spec"}]),
            json!([{"op": "add", "path": "/spec/x"}]),
        ] {
            assert!(
                apply_json_patch(&mut v, bad.as_array().expect("ops")).is_err(),
                "{bad}"
            );
        }
    }
}
