fn main() {
    eprintln!("crm-bench: no benchmark scenarios yet; the benchmark issue adds them");
    std::process::exit(2);
}
