//! Hostile guest: a valid component built for a different world (it exports `run`, not
//! `run-handler`), which the load gate must refuse.

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({ path: "wit", world: "other" });

    struct Other;

    impl Guest for Other {
        fn run(input: String) -> u32 {
            input.len() as u32
        }
    }

    export!(Other);
}
