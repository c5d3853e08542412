//! Fuzz the Dockerfile parser: no panic on any input, and wherever the
//! typed layer accepts a file its dump equals the node layer's dump, its
//! JSON serializes, and parsing again gives the same AST.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let nodes = kiln_parser::parse_nodes(&text);
    match kiln_parser::parse(&text) {
        Ok(df) => {
            let nodes = nodes
                .as_ref()
                .expect("the typed layer accepted what the node layer refused");
            assert_eq!(df.dump(), nodes.dump());
            let json = serde_json::to_string(&df).expect("serializes");
            let again = kiln_parser::parse(&text).expect("parses again");
            assert_eq!(json, serde_json::to_string(&again).expect("serializes"));
        }
        Err(e) => {
            // Rendering a located error must not panic either.
            let shown = e.to_string();
            assert!(shown.contains(&format!(":{}:{}", e.line, e.column)));
        }
    }
    if let Ok(nodes) = nodes {
        // Dumping never panics and always ends every instruction with `)\n`.
        let dump = nodes.dump();
        assert!(dump.matches(")\n").count() >= nodes.nodes.len());
    }
});
