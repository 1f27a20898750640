//! Every row of the API table of DESIGN.md, success and error, over real HTTP.

mod common;

use common::{Target, TestApp};
use serde_json::{json, Value};

fn detail_locs(body: &Value) -> Vec<String> {
    body["detail"]
        .as_array()
        .unwrap_or_else(|| panic!("detail is a list: {body}"))
        .iter()
        .map(|d| {
            assert!(d["msg"].is_string(), "{d}");
            d["loc"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
                .join(".")
        })
        .collect()
}

both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_and_read_events() {
        let app = TestApp::spawn();
        let r = app
            .post("/event", json!({"title": "Concert", "capacity": 100}))
            .await;
        assert_eq!(r.status, 200);
        assert!(r.content_type.starts_with("application/json"));
        let id = r.body["id"].as_i64().unwrap();
        assert_eq!(
            r.body,
            json!({"id": id, "title": "Concert", "capacity": 100, "booked_count": 0})
        );

        let r = app.get(&format!("/event/{id}")).await;
        assert_eq!(
            (r.status.as_u16(), &r.body),
            (
                200,
                &json!({"id": id, "title": "Concert", "capacity": 100, "booked_count": 0})
            )
        );

        let stats = json!({"event_id": id, "capacity": 100, "booked_count": 0, "finalized_count": 0});
        let r = app.get(&format!("/event/{id}/stats")).await;
        assert_eq!((r.status.as_u16(), &r.body), (200, &stats));
        let r = app.get(&format!("/report/event/{id}")).await;
        assert_eq!((r.status.as_u16(), &r.body), (200, &stats));

        for path in ["/event/999", "/event/999/stats", "/report/event/999"] {
            let r = app.get(path).await;
            assert_eq!(
                (r.status.as_u16(), &r.body),
                (404, &json!({"detail": "Event not found"})),
                "{path}"
            );
        }
        for bad in ["abc", "0", "-1", "1.5", "99999999999999999999", "%20"] {
            for path in [
                format!("/event/{bad}"),
                format!("/event/{bad}/stats"),
                format!("/report/event/{bad}"),
            ] {
                let r = app.get(&path).await;
                assert_eq!(r.status, 422, "{path}: {:?}", r.body);
                assert_eq!(detail_locs(&r.body), vec!["path.id"], "{path}");
            }
        }
    }
}

both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn event_validation_names_the_field() {
        let app = TestApp::spawn();
        let long = "x".repeat(201);
        let huge = "x".repeat(50_000);
        let cases = [
            (json!({"capacity": 10}), vec!["body.title"]),
            (json!({"title": "", "capacity": 10}), vec!["body.title"]),
            (json!({"title": long, "capacity": 10}), vec!["body.title"]),
            (json!({"title": huge, "capacity": 10}), vec!["body.title"]),
            (json!({"title": 12, "capacity": 10}), vec!["body.title"]),
            (json!({"title": "t"}), vec!["body.capacity"]),
            (json!({"title": "t", "capacity": 0}), vec!["body.capacity"]),
            (json!({"title": "t", "capacity": -3}), vec!["body.capacity"]),
            (
                json!({"title": "t", "capacity": "10"}),
                vec!["body.capacity"],
            ),
            (
                json!({"title": "t", "capacity": 10.5}),
                vec!["body.capacity"],
            ),
            (
                json!({"title": "t", "capacity": 9223372036854775807u64 + 1}),
                vec!["body.capacity"],
            ),
            (json!({}), vec!["body.title", "body.capacity"]),
            (json!([]), vec!["body"]),
            (json!(null), vec!["body"]),
            (json!("a string"), vec!["body"]),
        ];
        for (body, locs) in cases {
            let r = app.post("/event", body.clone()).await;
            assert_eq!(r.status, 422, "{body}: {:?}", r.body);
            assert!(r.content_type.starts_with("application/json"));
            assert_eq!(detail_locs(&r.body), locs, "{body}");
        }
        // Nothing was half-written.
        let r = app.get("/report").await;
        assert_eq!(
            r.body,
            json!({"total_capacity": 0, "total_reserved": 0, "total_finalized": 0, "dead_letters": 0})
        );
    }
}

both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_and_oversized_bodies() {
        let app = TestApp::spawn();
        for raw in [
            "{",
            "not json",
            "{\"title\": \"t\", \"capacity\": 1,}",
            "",
            "\u{0}",
        ] {
            for path in ["/event", "/book"] {
                let r = app.post_raw(path, raw.to_string()).await;
                assert_eq!(r.status, 422, "{path} {raw:?}: {:?}", r.body);
                assert_eq!(r.body["detail"][0]["type"], "json_invalid");
            }
        }
        let big = format!("{{\"title\": \"{}\", \"capacity\": 1}}", "y".repeat(70_000));
        for path in ["/event", "/book"] {
            let r = app.post_raw(path, big.clone()).await;
            assert_eq!(r.status, 413, "{path}");
            assert!(r.body["detail"].as_str().unwrap().contains("larger than"));
        }
        // Chunked (no Content-Length) oversize bodies are cut off too.
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            (0..100).map(|_| Ok(vec![b' '; 1024])).collect();
        let stream = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
        let r = app.post_raw("/book", stream).await;
        assert_eq!(r.status, 413);
    }
}

both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn booking_contract() {
        let app = TestApp::spawn();
        let id = app.create_event("Gig", 3).await;

        let r = app
            .post("/book", json!({"user_id": 7, "event_id": id}))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let b = &r.body;
        assert_eq!(b["event_id"], id);
        assert_eq!(b["user_id"], 7);
        assert_eq!(b["quantity"], 1);
        assert_eq!(b["status"], "PENDING");
        let created = b["created_at"].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(created).is_ok(),
            "ISO 8601: {created}"
        );
        assert!(created.ends_with('Z'), "UTC: {created}");
        let booking_id = b["id"].as_i64().unwrap();
        let secret = b["secret"].as_str().unwrap().to_string();
        assert!(secret.len() >= 22, "at least 128 bits: {secret}");

        let r = app
            .post(
                "/book",
                json!({"user_id": 8, "event_id": id, "quantity": 2}),
            )
            .await;
        assert_eq!(
            (r.status.as_u16(), r.body["quantity"].as_i64()),
            (200, Some(2))
        );

        let r = app
            .post("/book", json!({"user_id": 9, "event_id": id}))
            .await;
        assert_eq!(
            (r.status.as_u16(), &r.body),
            (409, &json!({"detail": "Event is sold out."}))
        );

        let r = app
            .post("/book", json!({"user_id": 9, "event_id": id + 1000}))
            .await;
        assert_eq!(
            (r.status.as_u16(), &r.body),
            (404, &json!({"detail": "Event not found"}))
        );

        let r = app.get_booking(booking_id, &secret).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body["id"], booking_id);
        assert!(["PENDING", "FINALIZED"].contains(&r.body["status"].as_str().unwrap()));
        let r = app.get_booking(424242, &secret).await;
        assert_eq!(
            (r.status.as_u16(), &r.body),
            (404, &json!({"detail": "Booking not found"}))
        );
        for bad in ["x", "0", "-4", "1e3"] {
            let r = app.get(&format!("/book/{bad}")).await;
            assert_eq!(r.status, 422, "{bad}");
            assert_eq!(detail_locs(&r.body), vec!["path.id"]);
        }

        let r = app.get(&format!("/event/{id}/stats")).await;
        assert_eq!(r.body["booked_count"], 3);
    }
}

both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partial_quantity_is_refused_with_what_is_left() {
        let app = TestApp::spawn();
        let id = app.create_event("Small", 2).await;
        let r = app
            .post(
                "/book",
                json!({"user_id": 1, "event_id": id, "quantity": 3}),
            )
            .await;
        assert_eq!(r.status, 409);
        assert_eq!(r.body["detail"], "Not enough seats left: 2 remaining.");
        let r = app
            .post(
                "/book",
                json!({"user_id": 1, "event_id": id, "quantity": 2}),
            )
            .await;
        assert_eq!(r.status, 200);
    }
}

both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn booking_validation_never_500s() {
        let app = TestApp::spawn();
        let id = app.create_event("Gig", 100).await;
        let huge = "9".repeat(40_000);
        let cases = [
            (json!({"event_id": id}), vec!["body.user_id"]),
            (json!({"user_id": 1}), vec!["body.event_id"]),
            (json!({"user_id": 0, "event_id": id}), vec!["body.user_id"]),
            (json!({"user_id": -1, "event_id": id}), vec!["body.user_id"]),
            (json!({"user_id": 1, "event_id": 0}), vec!["body.event_id"]),
            (
                json!({"user_id": 1, "event_id": -9223372036854775807i64}),
                vec!["body.event_id"],
            ),
            (
                json!({"user_id": 1, "event_id": 9223372036854775808u64}),
                vec!["body.event_id"],
            ),
            (
                json!({"user_id": 18446744073709551615u64, "event_id": id}),
                vec!["body.user_id"],
            ),
            (
                json!({"user_id": "1", "event_id": id}),
                vec!["body.user_id"],
            ),
            (
                json!({"user_id": huge, "event_id": id}),
                vec!["body.user_id"],
            ),
            (
                json!({"user_id": 1.5, "event_id": id}),
                vec!["body.user_id"],
            ),
            (
                json!({"user_id": 1, "event_id": 2.5}),
                vec!["body.event_id"],
            ),
            (
                json!({"user_id": true, "event_id": id}),
                vec!["body.user_id"],
            ),
            (
                json!({"user_id": [1], "event_id": {"id": 1}}),
                vec!["body.user_id", "body.event_id"],
            ),
            (
                json!({"user_id": 1, "event_id": id, "quantity": 0}),
                vec!["body.quantity"],
            ),
            (
                json!({"user_id": 1, "event_id": id, "quantity": -2}),
                vec!["body.quantity"],
            ),
            (
                json!({"user_id": 1, "event_id": id, "quantity": "2"}),
                vec!["body.quantity"],
            ),
            (
                json!({"user_id": 1, "event_id": id, "quantity": 1e300}),
                vec!["body.quantity"],
            ),
            (
                json!({"user_id": 1, "event_id": id, "quantity": 100_000}),
                vec!["body.quantity"],
            ),
            (json!({}), vec!["body.user_id", "body.event_id"]),
        ];
        for (body, locs) in cases {
            let r = app.post("/book", body.clone()).await;
            assert_eq!(r.status, 422, "{body}: {:?}", r.body);
            assert_eq!(detail_locs(&r.body), locs, "{body}");
        }
        // A number too big even for f64 parsing, sent raw.
        let r = app
            .post_raw(
                "/book",
                format!("{{\"user_id\": 1{}, \"event_id\": {id}}}", "0".repeat(400)),
            )
            .await;
        assert_eq!(r.status, 422, "{:?}", r.body);
        // Unknown fields are ignored, as the old service did.
        let r = app
            .post("/book", json!({"user_id": 1, "event_id": id, "note": "x"}))
            .await;
        assert_eq!(r.status, 200);
        let r = app.get(&format!("/event/{id}/stats")).await;
        assert_eq!(
            r.body["booked_count"], 1,
            "no refused request wrote anything"
        );
    }
}

both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_health_and_unknown_routes() {
        let app = TestApp::spawn();
        let r = app.get("/report").await;
        assert_eq!(
            (r.status.as_u16(), &r.body),
            (
                200,
                &json!({"total_capacity": 0, "total_reserved": 0, "total_finalized": 0, "dead_letters": 0})
            )
        );
        let a = app.create_event("A", 10).await;
        let b = app.create_event("B", 5).await;
        for (event, q) in [(a, 2), (b, 1), (b, 3)] {
            let r = app
                .post(
                    "/book",
                    json!({"user_id": 1, "event_id": event, "quantity": q}),
                )
                .await;
            assert_eq!(r.status, 200);
        }
        let r = app.get("/report").await;
        assert_eq!(r.body["total_capacity"], 15);
        assert_eq!(r.body["total_reserved"], 6);
        let finalized = r.body["total_finalized"].as_i64().unwrap();
        assert!((0..=6).contains(&finalized), "{finalized}");
        // Issuance is immediate in tests: every reserved seat ends issued, and counted once.
        let mut finalized = 0;
        for _ in 0..200 {
            finalized = app.get("/report").await.body["total_finalized"]
                .as_i64()
                .unwrap();
            if finalized == 6 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert_eq!(finalized, 6);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(app.get("/report").await.body["total_finalized"], 6);

        let r = app.get("/health").await;
        assert_eq!(
            (r.status.as_u16(), &r.body),
            (200, &json!({"status": "ok"}))
        );
        let r = app.get("/ready").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body["status"], "ready");
        assert_eq!(r.body["database"], "ok");

        let r = app.get("/nowhere").await;
        assert_eq!(
            (r.status.as_u16(), &r.body),
            (404, &json!({"detail": "Not Found"}))
        );
        let r = app
            .client
            .delete(format!("{}/event", app.base()))
            .send()
            .await
            .expect("an answer");
        // A 405 names what the path allows (RFC 9110 §15.5.6).
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()["allow"], "POST, GET, HEAD");
        assert_eq!(
            r.json::<Value>().await.expect("JSON"),
            json!({"detail": "Method Not Allowed"})
        );
        let r = app.post("/report", json!({})).await;
        assert_eq!(r.status, 405);
    }
}

both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tickets_are_issued_with_a_verifiable_code() {
        let app = TestApp::spawn_with(|c, _| c.finalize_delay_ms = 50);
        let id = app.create_event("Gig", 10).await;
        let r = app
            .post(
                "/book",
                json!({"user_id": 5, "event_id": id, "quantity": 2}),
            )
            .await;
        let booking = r.body["id"].as_i64().unwrap();
        let secret = r.body["secret"].as_str().unwrap().to_string();
        let mut last = Value::Null;
        for _ in 0..200 {
            last = app.get_booking(booking, &secret).await.body;
            if last["status"] == "FINALIZED" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert_eq!(last["status"], "FINALIZED", "{last}");
        let code = last["ticket_code"].as_str().unwrap();
        let signer = ticketd::ticket::TicketSigner::new(common::TEST_KEY.as_bytes());
        let facts = ticketd::ticket::TicketFacts {
            booking_id: booking,
            event_id: id,
            user_id: 5,
            quantity: 2,
        };
        assert!(signer.verify(code, &facts), "{code}");
        let stats = app.get(&format!("/event/{id}/stats")).await.body;
        assert_eq!(stats["finalized_count"], 2);
    }
}

/// A browser preflight with the given origin: `OPTIONS /event` asking to POST JSON with a key.
async fn preflight(app: &TestApp, origin: &str) -> reqwest::Response {
    app.http()
        .request(reqwest::Method::OPTIONS, format!("{}/event", app.base()))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "content-type, idempotency-key, authorization",
        )
        .send()
        .await
        .expect("preflight")
}

fn allowed_origin(r: &reqwest::Response) -> Option<String> {
    r.headers()
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap().to_string())
}

both_backends! {
    /// CORS as the old service had it (any origin): a web front end's preflight is answered for
    /// the methods and headers the API uses, and its calls carry `Access-Control-Allow-Origin`
    /// (with `Retry-After` readable); `CORS_ORIGINS` narrows it to the origins it names.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cors_like_the_old_service_and_narrowed_by_setting() {
        let app = TestApp::spawn();
        let r = preflight(&app, "https://any.example").await;
        assert_eq!(r.status(), 200);
        assert!(allowed_origin(&r).is_some(), "{:?}", r.headers());
        let methods = r.headers()["access-control-allow-methods"]
            .to_str()
            .unwrap();
        assert!(methods.contains("POST"), "{methods}");
        let r = app
            .http()
            .get(format!("{}/health", app.base()))
            .header("Origin", "https://any.example")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(allowed_origin(&r).is_some());
        let exposed = r.headers()["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .to_ascii_lowercase();
        assert!(exposed.contains("retry-after"), "{exposed}");

        let app = TestApp::spawn_with(|c, _| {
            c.cors_origins =
                ticketd::config::CorsOrigins::Only(vec!["https://shop.example".to_string()])
        });
        let r = preflight(&app, "https://shop.example").await;
        assert_eq!(r.status(), 200);
        assert_eq!(allowed_origin(&r).as_deref(), Some("https://shop.example"));
        let r = preflight(&app, "https://evil.example").await;
        assert_eq!(
            r.status(),
            400,
            "a preflight from another origin is refused"
        );
        assert_eq!(allowed_origin(&r), None);
        // ... with the API's JSON error, as every error.
        let body: Value = r.json().await.expect("a JSON body");
        assert!(
            body["detail"].as_str().is_some_and(|d| d.contains("rigin")),
            "{body}"
        );
    }
}

both_backends! {
    /// `GET /event` lists what is on sale, a page at a time: keyset pagination by id with a `next`
    /// cursor (null on the last page), a bounded `limit`, 422 naming a bad query parameter.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_are_listed_a_page_at_a_time() {
        let app = TestApp::spawn();
        let mut ids = Vec::new();
        for i in 0..5 {
            let r = app
                .post(
                    "/event",
                    json!({"title": format!("Gig {i}"), "capacity": 10 + i}),
                )
                .await;
            ids.push(r.body["id"].as_i64().unwrap());
        }
        let mut seen = Vec::new();
        let mut path = "/event?limit=2".to_string();
        let mut pages = 0;
        loop {
            let r = app.get(&path).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            let events = r.body["events"].as_array().unwrap();
            assert!(events.len() <= 2);
            for e in events {
                seen.push(e["id"].as_i64().unwrap());
                assert!(e["title"].as_str().unwrap().starts_with("Gig "));
                assert!(e.get("capacity").is_some() && e.get("booked_count").is_some());
            }
            pages += 1;
            match r.body["next"].as_i64() {
                Some(next) => path = format!("/event?limit=2&after={next}"),
                None => break,
            }
        }
        assert_eq!(seen, ids, "every event once, in id order");
        assert_eq!(pages, 3);
        // The default page holds them all.
        let r = app.get("/event").await;
        assert_eq!(r.body["events"].as_array().unwrap().len(), 5);
        assert_eq!(r.body["next"], Value::Null);
        // A last page that is exactly full says so: no empty page to fetch after it.
        let r = app.get("/event?limit=5").await;
        assert_eq!(r.body["events"].as_array().unwrap().len(), 5);
        assert_eq!(
            r.body["next"],
            Value::Null,
            "5 events, pages of 5: one page"
        );
        let r = app.get("/event?limit=4").await;
        assert_eq!(r.body["next"], json!(ids[3]));
        for (query, loc) in [
            ("limit=0", "limit"),
            ("limit=201", "limit"),
            ("limit=abc", "limit"),
            ("after=-1", "after"),
        ] {
            let r = app.get(&format!("/event?{query}")).await;
            assert_eq!(r.status, 422, "{query}");
            assert_eq!(r.body["detail"][0]["loc"], json!(["query", loc]), "{query}");
        }
    }
}

both_backends! {
    /// `/openapi.json`, Swagger UI and ReDoc are served by the binary itself (no CDN): the pages,
    /// their files, and a policy that keeps the browser from loading anything from elsewhere.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_description_and_its_viewers_are_served() {
        let app = TestApp::spawn();
        let spec = app.get("/openapi.json").await;
        assert_eq!(spec.status, 200);
        assert!(spec.content_type.starts_with("application/json"));
        assert_eq!(spec.body["openapi"], "3.1.0");
        for (path, method) in [
            ("/book", "post"),
            ("/book/{id}", "get"),
            ("/book/{id}/cancel", "post"),
            ("/event", "get"),
            ("/event", "post"),
            ("/report", "get"),
            ("/ticket/verify", "post"),
        ] {
            assert!(
                spec.body["paths"][path][method].is_object(),
                "{method} {path} described"
            );
        }

        let raw = |path: &str| {
            let url = format!("{}{path}", app.base());
            let client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("a client");
            async move { client.get(url).send().await.expect("an answer") }
        };
        let r = raw("/docs").await;
        assert_eq!(r.status(), 308);
        assert_eq!(r.headers()["location"], "/docs/");
        for (page, needle) in [("/docs/", "swagger-ui"), ("/redoc", "<redoc spec-url")] {
            let r = raw(page).await;
            assert_eq!(r.status(), 200, "{page}");
            let csp = r.headers()["content-security-policy"]
                .to_str()
                .expect("ascii")
                .to_string();
            assert!(csp.contains("default-src 'self'"), "{page}: {csp}");
            assert!(csp.contains("connect-src 'self'"), "{page}: {csp}");
            let html = r.text().await.expect("a page");
            assert!(html.contains(needle), "{page}: {html}");
            assert!(
                !html.contains("https://"),
                "{page} loads nothing from elsewhere"
            );
        }
        for (file, kind) in [
            ("/docs/swagger-ui-bundle.js", "javascript"),
            ("/docs/swagger-ui.css", "text/css"),
            ("/redoc/redoc.standalone.js", "javascript"),
        ] {
            let r = raw(file).await;
            assert_eq!(r.status(), 200, "{file}");
            let ct = r.headers()["content-type"].to_str().expect("ascii");
            assert!(ct.contains(kind), "{file}: {ct}");
        }
        // Swagger UI reads this service's description, and asks no outside validator.
        let init = raw("/docs/swagger-initializer.js")
            .await
            .text()
            .await
            .expect("a file");
        assert!(init.contains("\"url\": \"/openapi.json\""), "{init}");
        assert!(init.contains("\"validatorUrl\": \"none\""), "{init}");
        assert_eq!(raw("/docs/nothing.js").await.status(), 404);
    }
}
