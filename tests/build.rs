//! Builds the test guests (`tests/guests/*`) to components for the sandbox
//! tests, with the same code that builds the bundled policies.

#[path = "../xtask/src/guests.rs"]
#[allow(dead_code)]
mod guests;

fn main() {
    let hostile = || {
        Ok(vec![
            guests::Guest { package: "cachet-test-hostile".into(), name: "hostile".into() },
            guests::Guest { package: "cachet-test-hostile-loader".into(), name: "hostile-loader".into() },
            guests::Guest { package: "cachet-loader-users".into(), name: "users-loader".into() },
        ])
    };
    if let Err(err) = guests::build_script(|_| hostile()) {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}
