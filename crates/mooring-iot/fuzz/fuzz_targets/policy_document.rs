//! Fuzzes the IoT policy document parser, and evaluates whatever parses for a few requests
//! with a context carrying client, thing and certificate variables: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooring_iot::security::policy::{decide, Context, PolicyDocument, Request};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(document) = PolicyDocument::parse(text) else {
        return;
    };
    let mut context = Context::new();
    context.set("iot:ClientId", "dev-*?");
    context.set("iot:Connection.Thing.ThingName", "dev-1");
    context.set("iot:Connection.Thing.IsAttached", "true");
    context.set("iot:Certificate.Subject.CommonName", "cn");
    context.set_all("iot:ConnectAttributes", vec!["PersistentConnect".into()]);
    for (action, resource) in [
        ("iot:Connect", "arn:aws:iot:us-east-1:000000000000:client/dev-1"),
        ("iot:Publish", "arn:aws:iot:us-east-1:000000000000:topic/a/b/c"),
        ("iot:Subscribe", "arn:aws:iot:us-east-1:000000000000:topicfilter/a/+/#"),
        ("iot:Receive", text),
    ] {
        let _ = decide([&document], &Request { action, resource }, &context);
    }
    let _ = document.allows_everything();
});
