//! Compiles latchkey's own admin API and the slice of Envoy's access log it reads; Envoy's
//! other types come from the `envoy-types` crate.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc so a clean machine needs no system package.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; the variable is read by prost-build below.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds the migrations: a new one must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");
    // The descriptor set feeds gRPC reflection, so `grpcurl` needs no .proto file.
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("latchkey_admin_descriptor.bin");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .file_descriptor_set_path(descriptors)
        .compile_protos(&["proto/latchkey/admin/v1/admin.proto"], &["proto"])?;
    // The fields of Envoy's access log that latchkey reads; apart, so that reflection on
    // the admin port does not list a service it does not serve.
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_protos(&["proto/latchkey/envoy/access_log.proto"], &["proto"])?;
    Ok(())
}
