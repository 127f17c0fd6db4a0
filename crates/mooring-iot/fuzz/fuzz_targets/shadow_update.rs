//! Fuzzes the Device Shadow update path: the input is an update request payload, parsed and
//! applied twice (to nothing, then to the result). Neither may panic, and an accepted
//! update always yields a stored state within the size limit and a version one higher.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooring_iot::shadow::model::{apply_update, parse_update, MAX_STATE_BYTES};

fuzz_target!(|data: &[u8]| {
    let Ok(request) = parse_update(data) else {
        return;
    };
    let Ok(first) = apply_update(None, &request, 1) else {
        return;
    };
    assert_eq!(first.current.version, 1);
    if let Ok(second) = apply_update(Some(&first.current), &request, 2) {
        assert_eq!(second.current.version, 2);
        let state = serde_json::json!({
            "desired": second.current.desired,
            "reported": second.current.reported,
        });
        assert!(serde_json::to_vec(&state).unwrap().len() <= MAX_STATE_BYTES);
        let _ = second.current.render(3, None);
    }
});
