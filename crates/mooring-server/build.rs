//! Rebuild when the embedded dashboard files (web/) change, new files included.
fn main() {
    for p in ["../../web/index.html", "../../web/app", "../../web/vendor"] {
        println!("cargo:rerun-if-changed={p}");
    }
}
