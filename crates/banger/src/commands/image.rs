//! `banger image …` and `banger kernel …`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use banger_proto::{
    BuildImageRequest, BuildKernelRequest, BuildProgress, ByteSize, Image, ImageKernel,
    ImportImageRequest, ImportKernelRequest, Kernel, KernelBuildProgress, KernelCapabilities,
    PullRequest, PullResult, PushRequest, RegistryAccess, TransferProgress, TransferResult,
};
use hyper::Method;

use crate::cli::{ImageCommand, KernelCommand, RegistryArgs};
use crate::client::{Client, ClientError};
use crate::commands::{print_json, with_progress};
use crate::output;

/// Makes a user-given path absolute: the daemon does not share this shell's directory.
fn absolute(path: &std::path::Path) -> Result<String, ClientError> {
    std::path::absolute(path)
        .map(|p| p.display().to_string())
        .map_err(|e| ClientError::Other(anyhow::anyhow!("{}: {e}", path.display())))
}

/// `--from`: a registry reference as it is, `oci:DIR[:TAG]` with DIR made absolute.
fn absolute_from(from: &str) -> Result<String, ClientError> {
    let Some(rest) = from.strip_prefix("oci:") else {
        return Ok(from.to_owned());
    };
    let (dir, tag) = match rest.rsplit_once(':') {
        Some((dir, tag)) if !tag.contains('/') => (dir, Some(tag)),
        _ => (rest, None),
    };
    let dir = absolute(std::path::Path::new(dir))?;
    Ok(match tag {
        Some(tag) => format!("oci:{dir}:{tag}"),
        None => format!("oci:{dir}"),
    })
}

fn print_image(image: &Image, json: bool) -> Result<(), ClientError> {
    if json {
        return print_json(image);
    }
    let mut pairs = vec![
        ("name", image.name.clone()),
        ("digest", image.digest.clone()),
        ("kernel", image.kernel.clone()),
        ("size", ByteSize(image.size_bytes).to_string()),
        ("source", image.source.clone()),
        ("created", image.created_at.clone()),
    ];
    if let Some(seed) = &image.work_seed {
        pairs.push(("work-seed", seed[..12.min(seed.len())].to_owned()));
    }
    if let Some(exec) = &image.exec {
        if let Some(dir) = &exec.workdir {
            pairs.push(("exec workdir", dir.clone()));
        }
        if let Some(user) = &exec.user {
            pairs.push(("exec user", user.clone()));
        }
        if !exec.env.is_empty() {
            pairs.push(("exec env", exec.env.join(" ")));
        }
    }
    print!("{}", output::pairs(&pairs));
    Ok(())
}

/// A fresh id for `GET /v1/transfers/{id}`.
pub fn transfer_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}-{nanos}", std::process::id())
}

/// Runs `call` while a bar (bytes, rate) fed by the daemon's counters for transfer `id` shows
/// on a terminal; nothing shows while no transfer with that id runs.
pub async fn with_transfer_progress<T>(
    client: &Client,
    id: &str,
    message: &str,
    call: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    if !std::io::stderr().is_terminal() {
        return call.await;
    }
    let bar = indicatif::ProgressBar::hidden();
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ({elapsed})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(message.to_owned());
    tokio::pin!(call);
    let result = loop {
        tokio::select! {
            result = &mut call => break result,
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                let progress: Result<TransferProgress, _> = client
                    .call(Method::GET, &format!("/v1/transfers/{id}"), None::<&()>)
                    .await;
                if let Ok(p) = progress && p.running && p.total_bytes > 0 {
                    if bar.is_hidden() {
                        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                        bar.enable_steady_tick(Duration::from_millis(100));
                    }
                    bar.set_length(p.total_bytes);
                    bar.set_position(p.done_bytes);
                }
            }
        }
    };
    bar.finish_and_clear();
    result
}

fn access(args: &RegistryArgs) -> Result<RegistryAccess, ClientError> {
    let password = if args.password_stdin {
        let mut text = String::new();
        std::io::stdin()
            .read_line(&mut text)
            .map_err(|e| ClientError::Other(anyhow::anyhow!("cannot read the password: {e}")))?;
        Some(text.trim_end_matches(['\n', '\r']).to_owned())
    } else {
        None
    };
    Ok(RegistryAccess {
        username: args.username.clone(),
        password,
        insecure: args.insecure,
    })
}

/// `image|kernel push`.
async fn push(
    client: &Client,
    route: &str,
    name: String,
    reference: String,
    registry: &RegistryArgs,
    json: bool,
) -> Result<u8, ClientError> {
    let access = access(registry)?;
    let label = format!("pushing {reference}");
    let (result, elapsed): (TransferResult, _) =
        transfer(client, route, &label, |transfer_id| PushRequest {
            name,
            reference,
            access,
            transfer_id,
        })
        .await?;
    if json {
        print_json(&result)?;
    } else {
        println!(
            "Pushed {} to {} ({}): {}",
            result.name,
            result.reference,
            result.manifest_digest,
            summary(&result, elapsed)
        );
    }
    Ok(0)
}

/// `image|kernel pull`; prints the result and the stored object.
async fn pull(
    client: &Client,
    route: &str,
    reference: String,
    name: Option<String>,
    registry: &RegistryArgs,
    json: bool,
) -> Result<u8, ClientError> {
    let access = access(registry)?;
    let label = format!("pulling {reference}");
    let (pulled, elapsed): (PullResult, _) =
        transfer(client, route, &label, |transfer_id| PullRequest {
            reference,
            name,
            access,
            transfer_id,
        })
        .await?;
    let result = &pulled.transfer;
    if json {
        print_json(&pulled)?;
    } else {
        println!(
            "Pulled {} as {} ({}): {}",
            result.reference,
            result.name,
            result.manifest_digest,
            summary(result, elapsed)
        );
    }
    Ok(0)
}

/// One push or pull: the request made with a fresh transfer id, sent to `route` with the
/// transfer's progress shown under `label`; its answer and how long it took.
async fn transfer<Req, Res>(
    client: &Client,
    route: &str,
    label: &str,
    request: impl FnOnce(Option<String>) -> Req,
) -> Result<(Res, Duration), ClientError>
where
    Req: serde::Serialize,
    Res: serde::de::DeserializeOwned,
{
    let id = transfer_id();
    let request = request(Some(id.clone()));
    let started = Instant::now();
    let answer = with_transfer_progress(
        client,
        &id,
        label,
        client.call(Method::POST, route, Some(&request)),
    )
    .await?;
    Ok((answer, started.elapsed()))
}

fn summary(result: &TransferResult, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        ByteSize((result.bytes as f64 / secs) as u64).to_string()
    } else {
        "-".into()
    };
    format!(
        "{} blobs moved, {} present already, {} in {secs:.2}s ({rate}/s)",
        result.blobs,
        result.skipped,
        ByteSize(result.bytes)
    )
}

pub async fn run_image(client: &Client, command: ImageCommand) -> Result<u8, ClientError> {
    match command {
        ImageCommand::Push {
            name,
            reference,
            registry,
            json,
        } => {
            push(
                client,
                "/v1/images/push",
                name,
                reference,
                &registry,
                json.json,
            )
            .await
        }
        ImageCommand::Pull {
            reference,
            name,
            registry,
            json,
        } => {
            pull(
                client,
                "/v1/images/pull",
                reference,
                name,
                &registry,
                json.json,
            )
            .await
        }
        ImageCommand::Build {
            name,
            mirror,
            force,
            work_seed,
            from,
            insecure,
            kernel,
            json,
        } => {
            let request = BuildImageRequest {
                kernel: match kernel {
                    crate::cli::KernelArg::Microvm => ImageKernel::Microvm,
                    crate::cli::KernelArg::Debian => ImageKernel::Debian,
                },
                name: Some(name.clone()),
                mirror,
                force,
                work_seed: work_seed.as_deref().map(absolute).transpose()?,
                from: match from {
                    Some(from) => Some(absolute_from(&from)?),
                    None => None,
                },
                insecure,
            };
            let image: Image = build_with_progress(
                client,
                &format!("building image {name} (a few minutes the first time)"),
                &request,
            )
            .await?;
            print_image(&image, json.json)?;
            Ok(0)
        }
        ImageCommand::Import {
            name,
            rootfs,
            kernel,
            initrd,
            work_seed,
            json,
        } => {
            let kernel_path = std::path::Path::new(&kernel);
            let kernel = if kernel.contains('/') || kernel_path.is_file() {
                absolute(kernel_path)?
            } else {
                kernel
            };
            let request = ImportImageRequest {
                name,
                rootfs: absolute(&rootfs)?,
                kernel,
                initrd: initrd.as_deref().map(absolute).transpose()?,
                work_seed: work_seed.as_deref().map(absolute).transpose()?,
            };
            let image: Image = with_progress(
                "importing",
                client.call(Method::POST, "/v1/images/import", Some(&request)),
            )
            .await?;
            print_image(&image, json.json)?;
            Ok(0)
        }
        ImageCommand::Ls(flag) => {
            let images: Vec<Image> = client.call(Method::GET, "/v1/images", None::<&()>).await?;
            if flag.json {
                print_json(&images)?;
            } else {
                let rows: Vec<Vec<String>> = images
                    .iter()
                    .map(|i| {
                        vec![
                            i.name.clone(),
                            i.kernel.clone(),
                            ByteSize(i.size_bytes).to_string(),
                            i.digest[..12.min(i.digest.len())].to_owned(),
                            i.created_at.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    output::table(&["NAME", "KERNEL", "SIZE", "DIGEST", "CREATED"], &rows)
                );
            }
            Ok(0)
        }
        ImageCommand::Show { name, json } => {
            let image: Image = client
                .call(Method::GET, &format!("/v1/images/{name}"), None::<&()>)
                .await?;
            print_image(&image, json.json)?;
            Ok(0)
        }
        ImageCommand::Rm { name } => {
            client
                .call::<()>(Method::DELETE, &format!("/v1/images/{name}"), None::<&()>)
                .await?;
            println!("Removed image {name}");
            Ok(0)
        }
    }
}

pub async fn run_kernel(client: &Client, command: KernelCommand) -> Result<u8, ClientError> {
    match command {
        KernelCommand::Push {
            name,
            reference,
            registry,
            json,
        } => {
            push(
                client,
                "/v1/kernels/push",
                name,
                reference,
                &registry,
                json.json,
            )
            .await
        }
        KernelCommand::Pull {
            reference,
            name,
            registry,
            json,
        } => {
            pull(
                client,
                "/v1/kernels/pull",
                reference,
                name,
                &registry,
                json.json,
            )
            .await
        }
        KernelCommand::Import {
            name,
            kernel,
            initrd,
            json,
        } => {
            let request = ImportKernelRequest {
                name,
                kernel: absolute(&kernel)?,
                initrd: initrd.as_deref().map(absolute).transpose()?,
            };
            let kernel: Kernel = client
                .call(Method::POST, "/v1/kernels/import", Some(&request))
                .await?;
            if json.json {
                print_json(&kernel)?;
            } else {
                println!("Imported kernel {} ({})", kernel.name, &kernel.digest[..12]);
                for warning in &kernel.warnings {
                    eprintln!("{}", output::warning(warning));
                }
            }
            Ok(0)
        }
        KernelCommand::Build { name, force, json } => {
            let request = BuildKernelRequest {
                name: Some(name.clone()),
                force,
            };
            let kernel = build_kernel(client, &name, &request).await?;
            if json.json {
                print_json(&kernel)?;
            } else {
                print_kernel(&kernel);
            }
            Ok(0)
        }
        KernelCommand::Show { name, json } => {
            let kernel: Kernel = client
                .call(Method::GET, &format!("/v1/kernels/{name}"), None::<&()>)
                .await?;
            if json.json {
                print_json(&kernel)?;
            } else {
                print_kernel(&kernel);
            }
            Ok(0)
        }
        KernelCommand::Ls(flag) => {
            let kernels: Vec<Kernel> = client.call(Method::GET, "/v1/kernels", None::<&()>).await?;
            if flag.json {
                print_json(&kernels)?;
            } else {
                let rows: Vec<Vec<String>> = kernels
                    .iter()
                    .map(|k| {
                        vec![
                            k.name.clone(),
                            k.release.clone().unwrap_or_else(|| "-".into()),
                            if k.has_initrd { "yes" } else { "no" }.into(),
                            k.capabilities
                                .as_ref()
                                .map_or_else(|| "-".into(), boots_under),
                            k.digest[..12.min(k.digest.len())].to_owned(),
                            k.source.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    output::table(
                        &["NAME", "RELEASE", "INITRD", "BOOTS", "DIGEST", "SOURCE"],
                        &rows
                    )
                );
            }
            Ok(0)
        }
        KernelCommand::Rm { name } => {
            client
                .call::<()>(Method::DELETE, &format!("/v1/kernels/{name}"), None::<&()>)
                .await?;
            println!("Removed kernel {name}");
            Ok(0)
        }
    }
}

/// Which backends a kernel boots under, for `kernel ls`: `qemu`, or `qemu,firecracker`.
fn boots_under(caps: &KernelCapabilities) -> String {
    if caps.virtio_mmio_cmdline && !caps.needs_initrd {
        "qemu,firecracker".into()
    } else {
        "qemu".into()
    }
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.into()
}

fn print_kernel(kernel: &Kernel) {
    let mut pairs = vec![
        ("name", kernel.name.clone()),
        ("digest", kernel.digest.clone()),
        (
            "release",
            kernel.release.clone().unwrap_or_else(|| "-".into()),
        ),
        ("initrd", yes_no(kernel.has_initrd)),
        ("source", kernel.source.clone()),
        ("created", kernel.created_at.clone()),
    ];
    if let Some(caps) = &kernel.capabilities {
        pairs.extend([
            ("boots under", boots_under(caps)),
            ("virtio-mmio cmdline", yes_no(caps.virtio_mmio_cmdline)),
            ("virtio via ACPI", yes_no(caps.acpi_virtio)),
            ("needs initrd", yes_no(caps.needs_initrd)),
            ("PVH entry", yes_no(caps.pvh)),
            ("read from", caps.from.clone()),
        ]);
    }
    print!("{}", output::pairs(&pairs));
    for warning in &kernel.warnings {
        eprintln!("banger: warning: {warning}");
    }
}

/// Runs the build, showing the daemon's progress (polled) when stderr is a terminal, else a
/// line per ten percent.
async fn build_kernel(
    client: &Client,
    name: &str,
    request: &BuildKernelRequest,
) -> Result<Kernel, ClientError> {
    use std::io::IsTerminal;
    use std::time::Duration;
    let call = client.call(Method::POST, "/v1/kernels/build", Some(request));
    tokio::pin!(call);
    let terminal = std::io::stderr().is_terminal();
    let bar = terminal.then(|| {
        let bar = indicatif::ProgressBar::new(100);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {pos}% ({elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(format!("building kernel {name}"));
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let mut last_tenth = None;
    let result = loop {
        tokio::select! {
            result = &mut call => break result,
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                let progress: Result<KernelBuildProgress, _> = client
                    .call(Method::GET, "/v1/kernels/build/progress", None::<&()>)
                    .await;
                let Ok(p) = progress else { continue };
                if !p.running {
                    continue;
                }
                match &bar {
                    Some(bar) => {
                        bar.set_position(u64::from(p.percent));
                        bar.set_message(format!("kernel {name}: {}", p.step));
                    }
                    None if last_tenth != Some(p.percent / 10) => {
                        last_tenth = Some(p.percent / 10);
                        eprintln!("banger: kernel {name}: {}% {}", p.percent, p.step);
                    }
                    None => {}
                }
            }
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result
}

/// Runs the build request while polling the daemon for the build's latest step: shown in a
/// spinner on a TTY, printed on stderr as it changes otherwise.
async fn build_with_progress(
    client: &Client,
    message: &str,
    request: &BuildImageRequest,
) -> Result<Image, ClientError> {
    use std::io::IsTerminal;
    use std::time::Duration;
    let call = client.call(Method::POST, "/v1/images/build", Some(request));
    let tty = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new_spinner();
    if tty {
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.set_message(message.to_owned());
        bar.enable_steady_tick(Duration::from_millis(100));
    }
    let mut shown: Option<String> = None;
    tokio::pin!(call);
    let result = loop {
        tokio::select! {
            result = &mut call => break result,
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                let progress: Result<BuildProgress, _> = client
                    .call(Method::GET, "/v1/images/build/progress", None::<&()>)
                    .await;
                if let Ok(BuildProgress { running: true, step: Some(step) }) = progress
                    && shown.as_ref() != Some(&step)
                {
                    if tty {
                        bar.set_message(format!("{message}: {step}"));
                    } else {
                        eprintln!("{step}");
                    }
                    shown = Some(step);
                }
            }
        }
    };
    bar.finish_and_clear();
    result
}
