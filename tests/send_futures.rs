//! Every public future of the library is `Send`: a runtime spawns it on a multi-thread
//! executor (`tokio::spawn`, `#[async_trait]` implementations). This file compiles only if
//! that holds; running it checks that a spawned pull fails as a pull should.

use bux_fuse::{PullOptions, Store};

#[test]
fn public_futures_are_send() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Nothing listens on port 1 of the loopback interface: each pull fails there.
        let s = store.clone();
        let pull = tokio::spawn(async move {
            s.pull("127.0.0.1:1/nothing:here", &PullOptions::default())
                .await
        });
        let s = store.clone();
        let lazy = tokio::spawn(async move {
            s.pull_lazy("127.0.0.1:1/nothing:here", &PullOptions::default(), false)
                .await
        });
        let s = store.clone();
        let push = tokio::spawn(async move {
            s.push_index("127.0.0.1:1/nothing:here", &Default::default())
                .await
        });
        let login = tokio::spawn(async move {
            bux_fuse::registry::verify_login("127.0.0.1:1", &Default::default()).await
        });
        assert!(push.await.unwrap().is_err());
        assert!(login.await.unwrap().is_err());
        assert!(pull.await.unwrap().is_err());
        assert!(lazy.await.unwrap().is_err());
    });
}
