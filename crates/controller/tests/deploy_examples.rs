//! The configuration examples we ship (deploy/) load with the real config loaders.

use std::path::Path;

fn repo(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(p)
}

#[test]
fn controller_example_loads() {
    let c = controller::config::Config::load(&repo("deploy/controller.example.yaml")).unwrap();
    assert_eq!(c.boards.len(), 3);
    assert!(
        c.boards
            .iter()
            .all(|b| b.power.is_some() && b.console.is_some())
    );
    assert!(
        c.boards.iter().all(|b| c.tokens.boards.contains_key(&b.id)),
        "every board needs a token"
    );
    assert!(c.tls.is_some());
}

#[test]
fn agent_example_loads() {
    let c = agent::config::Config::load(&repo("deploy/agent.example.yaml")).unwrap();
    assert!(
        c.controller_url.ends_with(controller::link::PATH),
        "{}",
        c.controller_url
    );
    assert_eq!(c.board_file, Path::new("/etc/hil/board.yaml"));
}

#[test]
fn shipped_campaigns_compile() {
    for entry in std::fs::read_dir(repo("campaigns")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&p).unwrap();
            let c = controller::campaign::compile(
                &p.display().to_string(),
                &text,
                &repo("board-images/models"),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert!(
                !c.injections.is_empty(),
                "{} compiles to no trials",
                p.display()
            );
        }
    }
}
