//! The web pages: sign-in, activation, My Profile, Customer/Device Registration, Devices, a
//! device's page (with its timeline), Alarms, Device Certificate and Device Location.
//!
//! Each page is a static HTML shell plus one script (`web/app.js`) that reads the JSON API
//! with the signed-in user's bearer token. So a page can show nothing the API would not show
//! that user (the same scoping, the same 404s), and since no cookie is ever set there is
//! nothing a cross-site request could ride on: no CSRF by construction. Every asset is
//! compiled into the binary; the map's base layer is Natural Earth country outlines shipped
//! here, so the pages need no internet. A tile server is used only when configured
//! (`http.map_tile_url`).

use std::sync::LazyLock;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use crate::http::ApiState;

struct Page {
    path: &'static str,
    /// `data-page` of the body: which part of app.js runs.
    id: &'static str,
    title: &'static str,
    /// Reachable without signing in (no navigation shown).
    public: bool,
    body: &'static str,
}

const PAGES: &[Page] = &[
    Page {
        path: "/login",
        id: "login",
        title: "Sign in",
        public: true,
        body: include_str!("../web/login.html"),
    },
    Page {
        path: "/activate",
        id: "activate",
        title: "Activate your account",
        public: true,
        body: include_str!("../web/activate.html"),
    },
    Page {
        path: "/profile",
        id: "profile",
        title: "My Profile",
        public: false,
        body: include_str!("../web/profile.html"),
    },
    Page {
        path: "/register",
        id: "register",
        title: "Customer/Device Registration",
        public: false,
        body: include_str!("../web/register.html"),
    },
    Page {
        path: "/devices",
        id: "devices",
        title: "Devices",
        public: false,
        body: include_str!("../web/devices.html"),
    },
    Page {
        path: "/devices/{serial}",
        id: "device",
        title: "Device",
        public: false,
        body: include_str!("../web/device.html"),
    },
    Page {
        path: "/alarms",
        id: "alarms",
        title: "Alarms",
        public: false,
        body: include_str!("../web/alarms.html"),
    },
    Page {
        path: "/certificates",
        id: "certificates",
        title: "Device Certificate",
        public: false,
        body: include_str!("../web/certificates.html"),
    },
    Page {
        path: "/map",
        id: "map",
        title: "Device Location",
        public: false,
        body: include_str!("../web/map.html"),
    },
];

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../web/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../web/app.css"),
    },
    Asset {
        // Natural Earth 1:110m countries as TopoJSON, from the npm package world-atlas@2
        // (public domain data; see web/NOTICE). Regenerate with scripts/basemap.
        name: "countries-110m.json",
        content_type: "application/json",
        body: include_str!("../web/countries-110m.json"),
    },
];

/// Content hash of the assets: part of their URLs so a new build is never served stale.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    let mut h = Sha256::new();
    for a in ASSETS {
        h.update(a.body.as_bytes());
    }
    hex::encode(&h.finalize()[..6])
});

/// The page routes, for [`crate::router`].
pub(crate) fn routes() -> Router<ApiState> {
    let mut router = Router::new()
        .route("/", get(|| async { Redirect::to("/devices") }))
        .route("/assets/{name}", get(asset));
    for (i, page) in PAGES.iter().enumerate() {
        router = router.route(
            page.path,
            get(move |State(s): State<ApiState>| async move { render(&PAGES[i], &s) }),
        );
    }
    router.route(
        "/devices/",
        get(|| async { Redirect::permanent("/devices") }),
    )
}

fn render(page: &Page, s: &ApiState) -> Response {
    let tiles = s.map_tile_url.as_deref().unwrap_or("");
    let nav = if page.public {
        String::new()
    } else {
        NAV.to_owned()
    };
    let html = format!(
        r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · TMS Gateway</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/assets/app.css?v={v}">
<script src="/assets/app.js?v={v}" defer></script>
</head>
<body data-page="{id}" data-tile-url="{tiles}" data-mqtt-host="{mqtt_host}">
<a class="skip" href="#main">Skip to content</a>
<header class="top">
<a class="brand" href="/devices">TMS Gateway</a>
{nav}
</header>
<main id="main" tabindex="-1">
<h1>{title}</h1>
{body}
</main>
</body>
</html>
"##,
        title = page.title,
        id = page.id,
        v = *VERSION,
        tiles = attr_escape(tiles),
        mqtt_host = attr_escape(&s.mqtt_host),
        body = page.body,
    );
    let mut res = (StatusCode::OK, html).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(csp) = HeaderValue::from_str(&content_security_policy(s.map_tile_url.as_deref())) {
        h.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    // The activation token is in the page's URL: never send it to anyone as a referrer.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}

const NAV: &str = r#"<nav aria-label="Main">
<a href="/devices">Devices</a>
<a href="/alarms">Alarms</a>
<a href="/map">Device Location</a>
<a href="/certificates">Device Certificate</a>
<a href="/register" data-roles="provider admin" hidden>Registration</a>
<a href="/profile">My Profile</a>
<span class="who" id="who"></span>
<button type="button" id="sign-out" class="link">Sign out</button>
</nav>"#;

/// Scripts and styles only from the gateway itself; images also from the tile server when
/// one is configured; no frames, no plugins, forms post nowhere else.
fn content_security_policy(tile_url: Option<&str>) -> String {
    let tiles = tile_url.map(origin).unwrap_or_default();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob: {tiles}; \
         connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )
}

/// `https://tiles.example:8443/{z}/{x}/{y}.png` -> `https://tiles.example:8443`.
fn origin(url: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let end = url[after_scheme..]
        .find('/')
        .map_or(url.len(), |i| after_scheme + i);
    url[..end].to_owned()
}

fn attr_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.name == name) else {
        return (StatusCode::NOT_FOUND, "no such asset\n").into_response();
    };
    let etag = format!("\"{}\"", *VERSION);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == etag);
    let status = if fresh {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    };
    let body = if fresh { "" } else { a.body };
    (
        status,
        [
            (header::CONTENT_TYPE, a.content_type.to_owned()),
            (header::CACHE_CONTROL, "no-cache".to_owned()),
            (header::ETAG, etag),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_origin_goes_into_the_policy() {
        assert_eq!(
            origin("https://tiles.example:8443/{z}/{x}/{y}.png"),
            "https://tiles.example:8443"
        );
        let csp = content_security_policy(Some("http://osm.local/t/{z}/{x}/{y}.png"));
        assert!(
            csp.contains("img-src 'self' data: blob: http://osm.local;"),
            "{csp}"
        );
        assert!(!content_security_policy(None).contains("http"));
    }

    #[test]
    fn every_page_has_a_distinct_path_and_a_body() {
        let mut paths: Vec<_> = PAGES.iter().map(|p| p.path).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), PAGES.len());
        assert!(PAGES.iter().all(|p| !p.body.trim().is_empty()));
    }

    #[test]
    fn attributes_are_escaped() {
        assert_eq!(attr_escape(r#"x"><script>"#), "x&quot;&gt;&lt;script&gt;");
    }
}
