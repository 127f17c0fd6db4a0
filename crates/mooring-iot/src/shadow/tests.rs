//! Unit tests of the shadow document rules and of the service over an in-memory database.

use serde_json::json;

use super::model::*;

fn update(
    stored: Option<&StoredShadow>,
    body: serde_json::Value,
    now: i64,
) -> Result<Applied, ShadowError> {
    let request = parse_update(body.to_string().as_bytes())?;
    apply_update(stored, &request, now)
}

#[test]
fn merge_deletes_with_null_and_merges_objects_deeply() {
    let a = update(
        None,
        json!({"state":{"desired":{"color":"red","cfg":{"a":1,"b":2},"list":[1,2]}}}),
        100,
    )
    .unwrap();
    assert_eq!(a.current.version, 1);
    let b = update(
        Some(&a.current),
        json!({"state":{"desired":{"color":null,"cfg":{"b":3,"c":{"d":true}},"list":[3]},"reported":{"x":1}}}),
        200,
    )
    .unwrap();
    let s = &b.current;
    assert_eq!(s.version, 2);
    assert_eq!(
        serde_json::Value::Object(s.desired.clone().unwrap()),
        json!({"cfg":{"a":1,"b":3,"c":{"d":true}},"list":[3]})
    );
    assert_eq!(
        serde_json::Value::Object(s.desired_metadata.clone().unwrap()),
        json!({"cfg":{"a":{"timestamp":100},"b":{"timestamp":200},"c":{"d":{"timestamp":200}}},"list":[{"timestamp":200}]})
    );
    // Deleting every key removes the section; a null section removes it whole.
    let c = update(
        Some(s),
        json!({"state":{"desired":{"cfg":null,"list":null},"reported":null}}),
        300,
    )
    .unwrap();
    assert!(c.current.desired.is_none() && c.current.reported.is_none());
    assert_eq!(
        c.current.snapshot(),
        json!({"state":{},"metadata":{},"version":3})
    );
}

#[test]
fn a_null_for_a_missing_key_is_not_stored() {
    let a = update(
        None,
        json!({"state":{"reported":{"a":null,"b":{"c":null},"d":1}}}),
        5,
    )
    .unwrap();
    assert_eq!(
        serde_json::Value::Object(a.current.reported.unwrap()),
        json!({"d":1})
    );
}

#[test]
fn metadata_has_a_timestamp_per_array_element() {
    let v = json!({"a":[1,{"b":2},[3]]});
    assert_eq!(
        metadata_of(&v, 7),
        json!({"a":[{"timestamp":7},{"b":{"timestamp":7}},[{"timestamp":7}]]})
    );
}

#[test]
fn delta_holds_only_differing_desired_keys() {
    let desired = json!({"a":1,"b":{"c":2,"d":3},"e":[1,2],"f":"same"});
    let reported = json!({"a":2,"b":{"c":2},"e":[1,2],"f":"same","only_reported":9});
    let d = delta(desired.as_object().unwrap(), reported.as_object());
    assert_eq!(
        serde_json::Value::Object(d.clone()),
        json!({"a":1,"b":{"d":3}})
    );
    let meta = metadata_of(&desired, 4);
    assert_eq!(
        serde_json::Value::Object(delta_metadata(&d, meta.as_object())),
        json!({"a":{"timestamp":4},"b":{"d":{"timestamp":4}}})
    );
    // Arrays compare as whole values.
    let d = delta(
        json!({"e":[1,2]}).as_object().unwrap(),
        json!({"e":[2,1]}).as_object(),
    );
    assert_eq!(serde_json::Value::Object(d), json!({"e":[1,2]}));
}

#[test]
fn responses_have_the_documented_shapes() {
    let a = update(
        None,
        json!({"state":{"desired":{"t":20}},"clientToken":"tok"}),
        10,
    )
    .unwrap();
    assert_eq!(
        a.accepted,
        json!({"state":{"desired":{"t":20}},"metadata":{"desired":{"t":{"timestamp":10}}},"version":1,"timestamp":10,"clientToken":"tok"})
    );
    assert_eq!(
        a.delta,
        Some(
            json!({"state":{"t":20},"metadata":{"t":{"timestamp":10}},"version":1,"timestamp":10,"clientToken":"tok"})
        )
    );
    assert_eq!(
        a.documents,
        json!({"current":{"state":{"desired":{"t":20}},"metadata":{"desired":{"t":{"timestamp":10}}},"version":1},"timestamp":10,"clientToken":"tok"})
    );
    let b = update(Some(&a.current), json!({"state":{"reported":{"t":20}}}), 11).unwrap();
    assert_eq!(b.delta, None);
    assert_eq!(b.documents["previous"]["version"], json!(1));
    assert_eq!(
        b.documents["current"]["state"],
        json!({"desired":{"t":20},"reported":{"t":20}})
    );
    assert!(b.documents["current"]["state"].get("delta").is_none());
    assert_eq!(
        b.current.render(12, None),
        json!({"state":{"desired":{"t":20},"reported":{"t":20}},"metadata":{"desired":{"t":{"timestamp":10}},"reported":{"t":{"timestamp":11}}},"version":2,"timestamp":12})
    );
    let c = update(Some(&b.current), json!({"state":{"desired":{"t":22}}}), 13).unwrap();
    assert_eq!(
        c.current.render(14, Some("x"))["state"]["delta"],
        json!({"t":22})
    );
    // Deleting a desired key sends no delta even though one remains.
    let d = update(Some(&c.current), json!({"state":{"desired":{"u":1}}}), 15).unwrap();
    let e = update(
        Some(&d.current),
        json!({"state":{"desired":{"u":null}}}),
        16,
    )
    .unwrap();
    assert!(e.delta.is_none());
    assert!(!e.current.delta().is_empty());
}

#[test]
fn versions_conflict_and_survive_deletion() {
    let key = ShadowKey::new("t", None).unwrap();
    let a = update(None, json!({"state":{}}), 1).unwrap();
    assert_eq!(a.current.version, 1);
    let b = update(Some(&a.current), json!({"state":{},"version":1}), 2).unwrap();
    assert_eq!(b.current.version, 2);
    let conflict = update(Some(&b.current), json!({"state":{},"version":1}), 3).unwrap_err();
    assert_eq!(conflict, ShadowError::new(409, "Version conflict"));
    let (tombstone, body) = apply_delete(&key, Some(&b.current), 4, Some("d")).unwrap();
    assert_eq!(body, json!({"version":2,"timestamp":4,"clientToken":"d"}));
    assert!(!tombstone.exists());
    assert_eq!(
        apply_delete(&key, Some(&tombstone), 5, None)
            .unwrap_err()
            .code,
        404
    );
    let again = update(Some(&tombstone), json!({"state":{"reported":{"a":1}}}), 6).unwrap();
    assert_eq!(again.current.version, 3);
    assert!(again.documents.get("previous").is_none());
    let late = update(
        Some(&tombstone),
        json!({"state":{}}),
        4 + VERSION_MEMORY_SECS + 1,
    )
    .unwrap();
    assert_eq!(late.current.version, 1);
}

#[test]
fn invalid_requests_get_aws_codes_and_messages() {
    let cases: Vec<(&[u8], u16, &str)> = vec![
        (b"{not json", 400, "Invalid JSON"),
        (b"[1]", 400, "Invalid JSON"),
        (b"{}", 400, "Missing required node: state"),
        (br#"{"state":1}"#, 400, "State node must be an object"),
        (
            br#"{"state":{"desired":1}}"#,
            400,
            "Desired node must be an object",
        ),
        (
            br#"{"state":{"reported":"x"}}"#,
            400,
            "Reported node must be an object",
        ),
        (
            br#"{"state":{"delta":{}}}"#,
            400,
            "State contains an invalid node",
        ),
        (br#"{"state":{},"version":"1"}"#, 400, "Invalid version"),
        (
            br#"{"state":{"desired":{"a":[1,null]}}}"#,
            400,
            "State contains an invalid node",
        ),
        (
            b"\xff\xfe",
            415,
            "Unsupported documented encoding; supported encoding is UTF-8",
        ),
    ];
    for (body, code, message) in cases {
        let e = parse_update(body).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (code, message),
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
    let long_token = "x".repeat(65);
    let e = parse_update(
        json!({"state":{},"clientToken":long_token})
            .to_string()
            .as_bytes(),
    )
    .unwrap_err();
    assert_eq!(e.message, "Invalid clientToken");
    let deep = json!({"state":{"desired":{"1":{"2":{"3":{"4":{"5":{"6":{"7":1}}}}}}}}});
    assert_eq!(
        parse_update(deep.to_string().as_bytes())
            .unwrap_err()
            .message,
        "JSON contains too many levels of nesting; maximum is 6"
    );
    let ok = json!({"state":{"desired":{"1":{"2":{"3":{"4":{"5":{"6":1}}}}}}}});
    assert!(parse_update(ok.to_string().as_bytes()).is_ok());
    let big = json!({"state":{"reported":{"blob":"x".repeat(8200)}}});
    assert_eq!(
        parse_update(big.to_string().as_bytes()).unwrap_err().code,
        413
    );
    // The stored state is bounded too: two halves that fit alone do not fit together.
    let half = "y".repeat(5000);
    let a = update(None, json!({"state":{"reported":{"a":half}}}), 1).unwrap();
    assert_eq!(
        update(
            Some(&a.current),
            json!({"state":{"reported":{"b":half}}}),
            2
        )
        .unwrap_err()
        .code,
        413
    );
}

#[test]
fn names_are_validated_and_not_found_names_the_shadow() {
    assert!(ShadowKey::new("", None).is_err());
    assert!(ShadowKey::new("a/b", None).is_err());
    assert!(ShadowKey::new(&"t".repeat(129), None).is_err());
    assert!(ShadowKey::new("t", Some("")).is_err());
    assert!(ShadowKey::new("t", Some(&"s".repeat(65))).is_err());
    assert!(ShadowKey::new("t", Some("$cfg:1_-")).is_ok());
    assert_eq!(
        ShadowKey::new("t", None).unwrap().not_found().message,
        "No shadow exists with name: 't'"
    );
    assert_eq!(
        ShadowKey::new("t", Some("s")).unwrap().not_found().message,
        "No shadow exists with name: 't~s'"
    );
}

#[test]
fn random_payloads_never_panic_and_accepted_ones_keep_invariants() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let keys = ["a", "b", "c"];
    fn random_value(rng: &mut rand::rngs::StdRng, keys: &[&str], depth: u32) -> serde_json::Value {
        match rng.gen_range(0..if depth > 3 { 4 } else { 6 }) {
            0 => serde_json::Value::Null,
            1 => json!(rng.gen_range(0..3)),
            2 => json!("s"),
            3 => json!([rng.gen_range(0..2)]),
            _ => {
                let mut map = serde_json::Map::new();
                for _ in 0..rng.gen_range(0..3) {
                    let k = keys[rng.gen_range(0..keys.len())];
                    map.insert(k.into(), random_value(rng, keys, depth + 1));
                }
                serde_json::Value::Object(map)
            }
        }
    }
    let mut stored: Option<StoredShadow> = None;
    for i in 0..2000 {
        let body = json!({"state":{"desired":random_value(&mut rng, &keys, 0),"reported":random_value(&mut rng, &keys, 0)}});
        let mut bytes = body.to_string().into_bytes();
        if i % 7 == 0 && !bytes.is_empty() {
            let at = rng.gen_range(0..bytes.len());
            bytes[at] = rng.gen();
        }
        let Ok(request) = parse_update(&bytes) else {
            continue;
        };
        let applied = apply_update(stored.as_ref(), &request, i).unwrap();
        let s = &applied.current;
        assert_eq!(s.version, stored.as_ref().map_or(0, |p| p.version) + 1);
        // No null is ever stored, and metadata mirrors the state's keys.
        assert!(!s.snapshot()["state"].to_string().contains("null"));
        for (state, meta) in [
            (&s.desired, &s.desired_metadata),
            (&s.reported, &s.reported_metadata),
        ] {
            let sk: Vec<_> = state.iter().flat_map(|m| m.keys()).collect();
            let mk: Vec<_> = meta.iter().flat_map(|m| m.keys()).collect();
            assert_eq!(sk, mk);
        }
        stored = Some(applied.current);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_persists_before_answering() {
    let db = mooring_core::Db::open_in_memory().unwrap();
    let store = std::sync::Arc::new(super::store::SqliteShadowStore::open(db).unwrap());
    let clock: std::sync::Arc<dyn mooring_core::Clock> =
        std::sync::Arc::new(mooring_core::SystemClock);
    let shadows = super::Shadows::with_store(store.clone(), clock);
    let classic = ShadowKey::new("t", None).unwrap();
    let named = ShadowKey::new("t", Some("b")).unwrap();
    assert_eq!(shadows.get(&classic).await.unwrap_err().code, 404);
    shadows
        .update(&classic, br#"{"state":{"reported":{"x":1}}}"#)
        .await
        .unwrap();
    shadows
        .update(&named, br#"{"state":{"reported":{"x":1}}}"#)
        .await
        .unwrap();
    shadows
        .update(&ShadowKey::new("t", Some("a")).unwrap(), br#"{"state":{}}"#)
        .await
        .unwrap();
    use super::store::ShadowStore;
    assert_eq!(store.get_blocking(&classic).unwrap().unwrap().version, 1);
    assert_eq!(shadows.get_blocking(&named).unwrap().version, 1);
    assert_eq!(shadows.list_named("t").await.unwrap(), vec!["a", "b"]);
    shadows.delete(&named, None).await.unwrap();
    assert_eq!(shadows.list_named("t").await.unwrap(), vec!["a"]);
    assert!(shadows.get_blocking(&named).is_none());
    let again = shadows.update(&named, br#"{"state":{}}"#).await.unwrap();
    assert_eq!(again.current.version, 2);
}
