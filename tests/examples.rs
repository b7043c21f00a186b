//! Examples that are run, not only compiled, by the tests.

#[path = "../examples/custom_model.rs"]
mod custom_model;

/// A model outside the crate's families, built from the public layers, hooked and
/// spliced: the example checks its own results and returns an error if one fails.
#[test]
fn custom_model_example_runs() {
    custom_model::main().unwrap();
}
