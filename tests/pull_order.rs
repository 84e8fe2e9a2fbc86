//! A pull fetches and indexes its layers largest first: the pull ends when its last layer
//! does, and each layer is indexed on one core, so the one started last should be short.

mod common;

use std::sync::{Arc, Mutex};

use common::*;

#[test]
fn layers_are_fetched_largest_first() {
    let work = tempfile::tempdir().unwrap();
    let layer = |name: &str, size: usize, seed: u64| {
        LayerBuilder::new()
            .file(name, &test_bytes(size, seed))
            .finish()
    };
    // Bottom first: small, large, medium (the manifest's order is not the size order).
    let layers = [
        layer("small", 10_000, 1),
        layer("large", 400_000, 2),
        layer("medium", 100_000, 3),
    ];
    let image = Image::new(layers.iter().map(|l| (l.clone(), Comp::Gzip)).collect());
    let layout = work.path().join("layout");
    write_layout(&layout, "v1", &image);
    let store = bux_fuse::Store::open(work.path().join("store")).unwrap();
    let done = Arc::new(Mutex::new(Vec::new()));
    let seen = done.clone();
    let opts = bux_fuse::PullOptions {
        // One layer at a time: they finish in the order they were started.
        parallel: 1,
        progress: Some(Arc::new(move |p| {
            if let bux_fuse::Progress::LayerDone { layer, .. } = p {
                seen.lock().unwrap().push(layer);
            }
        })),
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(store.pull(&format!("oci:{}:v1", layout.display()), &opts))
        .unwrap();
    // The manifest's layers, bottom first.
    let blob = |d: &str| {
        let path = layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"));
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(path).unwrap()).unwrap()
    };
    let index = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(layout.join("index.json")).unwrap(),
    )
    .unwrap();
    let manifest = blob(index["manifests"][0]["digest"].as_str().unwrap());
    let blobs: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect();
    let order: Vec<usize> = done
        .lock()
        .unwrap()
        .iter()
        .map(|d| blobs.iter().position(|b| *b == d.hex()).unwrap())
        .collect();
    assert_eq!(
        order,
        vec![1, 2, 0],
        "layers done, by place in the manifest"
    );
}
