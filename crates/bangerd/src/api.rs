//! The HTTP transport: routes under `/v1`, the op_id middleware, JSON parsing that answers
//! every bad body with the API error shape, and the OpenAPI description (docs/api.yaml).
//! Handlers only parse, call one [`Manager`] method and render.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use banger_core::service::Manager;
use banger_proto::{
    ApiError, BuildImageRequest, BuildKernelRequest, BuildProgress, CheckStatus, CloneVmRequest,
    ConsoleChunk, CopyDirection, CopyRequest, CopyResult, CreateSnapshotRequest, CreateVmRequest,
    DaemonStatus, DiskFsck, DiskUsage, DoctorCheck, DoctorReport, ErrorBody, ErrorCode,
    ExecDefaults, ExportResult, ExportWorkspaceRequest, FsUsage, FsckResult, GuestStats, Image,
    ImageKernel, ImportImageRequest, ImportKernelRequest, Kernel, KernelBuildProgress,
    KernelCapabilities, LastStop, LeaseInfo, LifecycleResult, NetCounters, NetworkStatus,
    OP_ID_HEADER, PortChangeRequest, PortList, PortMapping, PortProto, PrepareProgress,
    PrepareResult, PrepareWorkspaceRequest, PullPolicy, PullRequest, PullResult, PushRequest,
    RegistryAccess, SetVmRequest, SetVmResult, SnapshotList, SnapshotSummary, SshConfigRequest,
    SshConfigResult, SshInfo, StartFsck, StopKind, StopVmRequest, TransferProgress, TransferResult,
    Vm, VmNetwork, VmRuntime, VmSnapshot, VmSpec, VmState, VmStats, WorkspaceDiff, WorkspaceStatus,
};
use serde::de::DeserializeOwned;
use tracing::{Instrument, info, info_span, warn};
use utoipa::OpenApi;

/// Shared by every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    manager: Arc<Manager>,
    shutdown: Arc<tokio::sync::Notify>,
    started_at: SystemTime,
    started: Instant,
}

impl AppState {
    pub fn new(manager: Arc<Manager>, shutdown: Arc<tokio::sync::Notify>) -> Self {
        Self {
            manager,
            shutdown,
            started_at: SystemTime::now(),
            started: Instant::now(),
        }
    }
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/shutdown", post(shutdown))
        .route("/v1/doctor", get(doctor))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/stats", get(stats))
        .route(
            "/v1/vms/{name}",
            get(get_vm).patch(set_vm).delete(remove_vm),
        )
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/pause", post(pause_vm))
        .route("/v1/vms/{name}/resume", post(resume_vm))
        .route("/v1/vms/{name}/suspend", post(suspend_vm))
        .route("/v1/vms/{name}/clone", post(clone_vm))
        .route("/v1/vms/{name}/ssh", get(ssh_info))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/vms/{name}/ports", get(list_ports).post(change_ports))
        .route(
            "/v1/vms/{name}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
        .route(
            "/v1/vms/{name}/snapshots/{snapshot}",
            axum::routing::delete(remove_snapshot),
        )
        .route(
            "/v1/vms/{name}/snapshots/{snapshot}/restore",
            post(restore_snapshot),
        )
        .route("/v1/vms/{name}/workspace", get(workspace_status))
        .route("/v1/vms/{name}/workspace/prepare", post(prepare_workspace))
        .route("/v1/vms/{name}/workspace/export", post(export_workspace))
        .route("/v1/vms/{name}/workspace/progress", get(prepare_progress))
        .route("/v1/vms/{name}/cp", post(copy))
        .route("/v1/images", get(list_images))
        .route("/v1/images/import", post(import_image))
        .route("/v1/images/build", post(build_image))
        .route("/v1/images/build/progress", get(build_progress))
        .route("/v1/images/{name}", get(get_image).delete(remove_image))
        .route("/v1/kernels", get(list_kernels))
        .route("/v1/kernels/import", post(import_kernel))
        .route("/v1/kernels/build", post(build_kernel))
        .route("/v1/kernels/build/progress", get(kernel_build_progress))
        .route("/v1/kernels/{name}", get(get_kernel).delete(remove_kernel))
        .route("/v1/images/push", post(push_image))
        .route("/v1/images/pull", post(pull_image))
        .route("/v1/kernels/push", post(push_kernel))
        .route("/v1/kernels/pull", post(pull_kernel))
        .route("/v1/transfers/{id}", get(transfer_progress))
        .route("/v1/network", get(network_status))
        .route("/v1/network/down", post(network_down))
        .route("/v1/ssh-config", post(ssh_config))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(op_id_span))
        .with_state(state)
}

/// Opens the request span carrying the op_id (the client's `X-Banger-Op-Id`, or a new one)
/// and echoes the op_id in the response.
async fn op_id_span(request: Request, next: Next) -> Response {
    let op_id = request
        .headers()
        .get(OP_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_op_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let span = info_span!("request", op_id = %op_id);
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let started = Instant::now();
    let task_op_id = op_id.clone();
    // Its own task: hyper drops a handler's future when the client goes away (Ctrl-C on
    // `banger vm start`), which would cancel an operation half-way, past its undo logic. A
    // spawned task runs to completion whoever waits for it.
    let handled = tokio::spawn(
        banger_core::net::OP_ID.scope(
            task_op_id,
            async move {
                info!(%method, %path, "request");
                let response = next.run(request).await;
                info!(
                    status = response.status().as_u16(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "response"
                );
                response
            }
            .instrument(span),
        ),
    );
    let mut response = match handled.await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(op_id = %op_id, "request handler failed: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    };
    if let Ok(value) = HeaderValue::from_str(&op_id) {
        response.headers_mut().insert(OP_ID_HEADER, value);
    }
    response
}

/// op_ids are short tokens, so they can be grepped and put in headers and file names safely.
fn valid_op_id(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// An error response with the [`ErrorBody`] shape.
#[derive(Debug)]
pub struct HttpError(ApiError);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            warn!(code = ?self.0.code, "{}", self.0.message);
        } else {
            info!(code = ?self.0.code, "{}", self.0.message);
        }
        (status, Json(ErrorBody { error: self.0 })).into_response()
    }
}

impl From<banger_core::Error> for HttpError {
    fn from(err: banger_core::Error) -> Self {
        Self(err.to_api())
    }
}

/// A JSON body parsed with serde; any failure (syntax, unknown field, wrong type, too large)
/// becomes an `invalid_json` error body instead of axum's plain-text rejection.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = HttpError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state).await.map_err(|e| {
            HttpError(ApiError::new(
                ErrorCode::InvalidJson,
                format!("cannot read request body: {e}"),
            ))
        })?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            HttpError(
                ApiError::new(ErrorCode::InvalidJson, format!("invalid request body: {e}"))
                    .with_hint("see docs/api.yaml for the request schema"),
            )
        })
    }
}

async fn unknown_route(request: Request) -> HttpError {
    HttpError(
        ApiError::new(
            ErrorCode::NotFound,
            format!("no route {}", request.uri().path()),
        )
        .with_hint("routes are listed in docs/api.yaml"),
    )
}

async fn method_not_allowed(request: Request) -> HttpError {
    HttpError(ApiError::new(
        ErrorCode::InvalidRequest,
        format!(
            "method {} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    ))
}

#[utoipa::path(get, path = "/v1/status", tag = "daemon",
    responses((status = 200, description = "The daemon runs", body = DaemonStatus)))]
async fn status(State(state): State<AppState>) -> Json<DaemonStatus> {
    // The VM count and RSS are cheap: one SQLite read and /proc/self/status.
    let layout = state.manager.layout();
    Json(DaemonStatus {
        version: banger_core::VERSION.to_owned(),
        pid: std::process::id(),
        socket: layout.socket().display().to_string(),
        data_dir: layout.data_dir().display().to_string(),
        runtime_dir: layout.runtime_dir().display().to_string(),
        log_file: layout.daemon_log().display().to_string(),
        started_at: banger_core::format_rfc3339(state.started_at),
        uptime_secs: state.started.elapsed().as_secs(),
        rss_bytes: banger_core::usage::own_rss(),
        running_vms: state.manager.running_vm_count().await.unwrap_or(0),
    })
}

#[utoipa::path(post, path = "/v1/shutdown", tag = "daemon",
    responses((status = 202, description = "The daemon stops after answering; VMs keep running")))]
async fn shutdown(State(state): State<AppState>) -> StatusCode {
    state.shutdown.notify_one();
    StatusCode::ACCEPTED
}

#[utoipa::path(get, path = "/v1/doctor", tag = "daemon",
    responses((status = 200, description = "Host checks; `ok` is false when one failed", body = DoctorReport),
              (status = 500, body = ErrorBody)))]
async fn doctor(State(state): State<AppState>) -> Result<Json<DoctorReport>, HttpError> {
    Ok(Json(state.manager.doctor().await?))
}

#[utoipa::path(get, path = "/v1/vms", tag = "vms",
    responses((status = 200, description = "All VMs, by name", body = [Vm]),
              (status = 500, body = ErrorBody)))]
async fn list_vms(State(state): State<AppState>) -> Result<Json<Vec<Vm>>, HttpError> {
    Ok(Json(state.manager.list_vms().await?))
}

#[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = CreateVmRequest,
    responses((status = 201, description = "Created", body = Vm),
              (status = 400, description = "Bad name or body", body = ErrorBody),
              (status = 409, description = "Name taken", body = ErrorBody)))]
async fn create_vm(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CreateVmRequest>,
) -> Result<(StatusCode, Json<Vm>), HttpError> {
    let vm = state.manager.create_vm(request).await?;
    Ok((StatusCode::CREATED, Json(vm)))
}

#[utoipa::path(get, path = "/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = Vm),
              (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn get_vm(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vm>, HttpError> {
    Ok(Json(state.manager.get_vm(&name).await?))
}

#[utoipa::path(patch, path = "/v1/vms/{name}", tag = "vms", request_body = SetVmRequest,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Changed (`changed` lists what; empty when nothing differed)", body = SetVmResult),
              (status = 400, description = "Refused (a smaller disk, more than the host has); nothing changed", body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, description = "Not while the VM runs (CPUs, memory, system disk), is paused or suspended", body = ErrorBody),
              (status = 422, body = ErrorBody)))]
async fn set_vm(
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<SetVmRequest>,
) -> Result<Json<SetVmResult>, HttpError> {
    Ok(Json(state.manager.set_vm(&name, request).await?))
}

#[utoipa::path(delete, path = "/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 204, description = "Removed with its disks"),
              (status = 404, body = ErrorBody),
              (status = 409, description = "The VM runs", body = ErrorBody)))]
async fn remove_vm(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, HttpError> {
    state.manager.remove_vm(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/vms/{name}/ports", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "The VM's published ports", body = PortList),
              (status = 404, body = ErrorBody)))]
async fn list_ports(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<PortList>, HttpError> {
    Ok(Json(state.manager.list_ports(&name).await?))
}

#[utoipa::path(post, path = "/v1/vms/{name}/ports", tag = "vms", request_body = PortChangeRequest,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Changed (live on a running VM) and kept with the VM", body = PortList),
              (status = 400, description = "A busy, duplicate or unknown port; nothing changed", body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn change_ports(
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<PortChangeRequest>,
) -> Result<Json<PortList>, HttpError> {
    Ok(Json(state.manager.change_ports(&name, request).await?))
}

#[utoipa::path(post, path = "/v1/vms/{name}/clone", tag = "snapshots",
    request_body = CloneVmRequest,
    params(("name" = String, Path, description = "The source VM")),
    responses((status = 200, description = "The clone, created (not started)", body = Vm),
              (status = 404, body = ErrorBody),
              (status = 409, description = "The name is taken, or the source must be stopped to snapshot it", body = ErrorBody)))]
async fn clone_vm(
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<CloneVmRequest>,
) -> Result<Json<Vm>, HttpError> {
    Ok(Json(state.manager.clone_vm(&name, request).await?))
}

#[utoipa::path(get, path = "/v1/vms/{name}/snapshots", tag = "snapshots",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "The VM's named snapshots, oldest first", body = SnapshotList),
              (status = 404, body = ErrorBody)))]
async fn list_snapshots(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<SnapshotList>, HttpError> {
    Ok(Json(state.manager.list_named_snapshots(&name).await?))
}

#[utoipa::path(post, path = "/v1/vms/{name}/snapshots", tag = "snapshots",
    request_body = CreateSnapshotRequest,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Taken: the VM's disk files are the snapshot's now, the VM continues on new overlays", body = VmSnapshot),
              (status = 404, body = ErrorBody),
              (status = 409, description = "The VM is not stopped, or the name is taken", body = ErrorBody)))]
async fn create_snapshot(
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<CreateSnapshotRequest>,
) -> Result<Json<VmSnapshot>, HttpError> {
    Ok(Json(
        state.manager.create_named_snapshot(&name, request).await?,
    ))
}

#[utoipa::path(post, path = "/v1/vms/{name}/snapshots/{snapshot}/restore", tag = "snapshots",
    params(("name" = String, Path, description = "VM name"),
           ("snapshot" = String, Path, description = "Snapshot name")),
    responses((status = 200, description = "The VM's disks are the snapshot's; what was written since is gone", body = Vm),
              (status = 404, body = ErrorBody),
              (status = 409, description = "The VM is not stopped", body = ErrorBody)))]
async fn restore_snapshot(
    State(state): State<AppState>,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<Json<Vm>, HttpError> {
    Ok(Json(
        state
            .manager
            .restore_named_snapshot(&name, &snapshot)
            .await?,
    ))
}

#[utoipa::path(delete, path = "/v1/vms/{name}/snapshots/{snapshot}", tag = "snapshots",
    params(("name" = String, Path, description = "VM name"),
           ("snapshot" = String, Path, description = "Snapshot name")),
    responses((status = 204, description = "Removed; what continued from it was rebased off it"),
              (status = 404, body = ErrorBody),
              (status = 409, description = "A clone continues from it, or the VM must be stopped first", body = ErrorBody)))]
async fn remove_snapshot(
    State(state): State<AppState>,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<StatusCode, HttpError> {
    state
        .manager
        .remove_named_snapshot(&name, &snapshot)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/network", tag = "network",
    responses((status = 200, description = "The bridge network, the helper and the leases", body = NetworkStatus)))]
async fn network_status(State(state): State<AppState>) -> Result<Json<NetworkStatus>, HttpError> {
    Ok(Json(state.manager.network_status().await?))
}

#[utoipa::path(post, path = "/v1/network/down", tag = "network",
    responses((status = 200, description = "Every tap, the bridge and the nftables table removed", body = NetworkStatus),
              (status = 400, description = "Bridge VMs run", body = ErrorBody),
              (status = 422, description = "The root helper does not answer", body = ErrorBody)))]
async fn network_down(State(state): State<AppState>) -> Result<Json<NetworkStatus>, HttpError> {
    Ok(Json(state.manager.network_down().await?))
}

#[utoipa::path(post, path = "/v1/ssh-config", tag = "network", request_body = SshConfigRequest,
    responses((status = 200, description = "The generated ssh config was written", body = SshConfigResult)))]
async fn ssh_config(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<SshConfigRequest>,
) -> Result<Json<SshConfigResult>, HttpError> {
    Ok(Json(state.manager.ssh_config(request.install).await?))
}

#[utoipa::path(post, path = "/v1/vms/{name}/start", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Running (changed=false when it already ran)", body = LifecycleResult),
              (status = 404, body = ErrorBody),
              (status = 422, description = "The start failed and was undone", body = ErrorBody)))]
async fn start_vm(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<LifecycleResult>, HttpError> {
    Ok(Json(state.manager.start_vm(&name).await?))
}

#[utoipa::path(post, path = "/v1/vms/{name}/stop", tag = "vms", request_body = StopVmRequest,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Stopped (changed=false when it was not running)", body = LifecycleResult),
              (status = 404, body = ErrorBody)))]
async fn stop_vm(
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<StopVmRequest>,
) -> Result<Json<LifecycleResult>, HttpError> {
    Ok(Json(state.manager.stop_vm(&name, request.force).await?))
}

#[utoipa::path(post, path = "/v1/vms/{name}/pause", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Paused (changed=false when it already was)", body = LifecycleResult),
              (status = 404, body = ErrorBody),
              (status = 409, description = "The VM is not running", body = ErrorBody)))]
async fn pause_vm(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<LifecycleResult>, HttpError> {
    Ok(Json(state.manager.pause_vm(&name).await?))
}

#[utoipa::path(post, path = "/v1/vms/{name}/resume", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Running (changed=false when it was not paused)", body = LifecycleResult),
              (status = 404, body = ErrorBody),
              (status = 409, description = "The VM is not running or paused", body = ErrorBody)))]
async fn resume_vm(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<LifecycleResult>, HttpError> {
    Ok(Json(state.manager.resume_vm(&name).await?))
}

#[utoipa::path(post, path = "/v1/vms/{name}/suspend", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Suspended: memory snapshot written, VMM ended (changed=false when it already was)", body = LifecycleResult),
              (status = 400, description = "The VM's backend cannot save its memory (Firecracker through the jailer)", body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, description = "The VM is not running", body = ErrorBody),
              (status = 422, description = "The snapshot failed; the VM runs on", body = ErrorBody)))]
async fn suspend_vm(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<LifecycleResult>, HttpError> {
    Ok(Json(state.manager.suspend_vm(&name).await?))
}

#[utoipa::path(get, path = "/v1/vms/{name}/ssh", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = SshInfo),
              (status = 409, description = "The VM is not running", body = ErrorBody)))]
async fn ssh_info(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<SshInfo>, HttpError> {
    Ok(Json(state.manager.ssh_info(&name).await?))
}

/// Query of `GET /v1/stats`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
struct StatsQuery {
    /// Comma-separated VM names (default: every VM).
    #[serde(default)]
    names: String,
    /// Also ask running guests for their own figures (one SSH round trip each).
    #[serde(default)]
    guest: bool,
}

#[utoipa::path(get, path = "/v1/stats", tag = "vms",
    params(StatsQuery),
    responses((status = 200, description = "What each VM costs, by name", body = [VmStats]),
              (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn stats(
    State(state): State<AppState>,
    Query(query): Query<StatsQuery>,
) -> Result<Json<Vec<VmStats>>, HttpError> {
    let names: Vec<String> = query
        .names
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(Json(state.manager.vm_stats(&names, query.guest).await?))
}

/// Query of `GET /v1/vms/{name}/console`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
struct ConsoleQuery {
    /// Byte offset to read from (default 0).
    #[serde(default)]
    offset: u64,
}

#[utoipa::path(get, path = "/v1/vms/{name}/console", tag = "vms",
    params(("name" = String, Path, description = "VM name"), ConsoleQuery),
    responses((status = 200, body = ConsoleChunk), (status = 404, body = ErrorBody)))]
async fn console(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<ConsoleQuery>,
) -> Result<Json<ConsoleChunk>, HttpError> {
    Ok(Json(state.manager.console(&name, query.offset).await?))
}

#[utoipa::path(post, path = "/v1/vms/{name}/workspace/prepare", tag = "workspace",
    request_body = PrepareWorkspaceRequest,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Sent; the counters say how much", body = PrepareResult),
              (status = 400, description = "Not a git top level, unsafe path, relative path", body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, description = "The VM is not running", body = ErrorBody),
              (status = 422, description = "The transfer failed", body = ErrorBody)))]
async fn prepare_workspace(
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<PrepareWorkspaceRequest>,
) -> Result<Json<PrepareResult>, HttpError> {
    Ok(Json(state.manager.prepare_workspace(&name, request).await?))
}

#[utoipa::path(get, path = "/v1/vms/{name}/workspace/progress", tag = "workspace",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "The running prepare's counters (running=false when none)", body = PrepareProgress)))]
async fn prepare_progress(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<PrepareProgress>, HttpError> {
    Ok(Json(state.manager.prepare_progress(&name)?))
}

/// Query of `GET /v1/vms/{name}/workspace`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
struct WorkspaceQuery {
    /// Also compare the guest's files with the manifest (needs a running VM).
    #[serde(default)]
    guest: bool,
}

#[utoipa::path(get, path = "/v1/vms/{name}/workspace", tag = "workspace",
    params(("name" = String, Path, description = "VM name"), WorkspaceQuery),
    responses((status = 200, body = WorkspaceStatus),
              (status = 404, body = ErrorBody),
              (status = 409, description = "guest=true on a VM that is not running", body = ErrorBody)))]
async fn workspace_status(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<WorkspaceQuery>,
) -> Result<Json<WorkspaceStatus>, HttpError> {
    Ok(Json(
        state.manager.workspace_status(&name, query.guest).await?,
    ))
}

#[utoipa::path(post, path = "/v1/vms/{name}/workspace/export", tag = "workspace",
    request_body = ExportWorkspaceRequest,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = ExportResult),
              (status = 400, description = "No git workspace was prepared, or a bad destination", body = ErrorBody),
              (status = 409, description = "The VM is not running", body = ErrorBody)))]
async fn export_workspace(
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<ExportWorkspaceRequest>,
) -> Result<Json<ExportResult>, HttpError> {
    Ok(Json(state.manager.export_workspace(&name, request).await?))
}

#[utoipa::path(post, path = "/v1/vms/{name}/cp", tag = "workspace",
    request_body = CopyRequest,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Copied; skipped guest entries are listed", body = CopyResult),
              (status = 400, description = "A bad path, or a destination that would be followed or is of another kind", body = ErrorBody),
              (status = 409, description = "The VM is not running", body = ErrorBody),
              (status = 422, description = "The copy failed or the guest's tar was refused; nothing was written", body = ErrorBody)))]
async fn copy(
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<CopyRequest>,
) -> Result<Json<CopyResult>, HttpError> {
    Ok(Json(state.manager.copy(&name, request).await?))
}

#[utoipa::path(get, path = "/v1/images", tag = "images",
    responses((status = 200, body = [Image])))]
async fn list_images(State(state): State<AppState>) -> Result<Json<Vec<Image>>, HttpError> {
    Ok(Json(state.manager.list_images().await?))
}

#[utoipa::path(get, path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name")),
    responses((status = 200, body = Image), (status = 404, body = ErrorBody)))]
async fn get_image(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Image>, HttpError> {
    Ok(Json(state.manager.get_image(&name).await?))
}

#[utoipa::path(delete, path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name")),
    responses((status = 204, description = "Removed"),
              (status = 404, body = ErrorBody),
              (status = 409, description = "A VM uses it", body = ErrorBody)))]
async fn remove_image(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, HttpError> {
    state.manager.remove_image(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/images/import", tag = "images", request_body = ImportImageRequest,
    responses((status = 201, body = Image), (status = 400, body = ErrorBody)))]
async fn import_image(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<ImportImageRequest>,
) -> Result<(StatusCode, Json<Image>), HttpError> {
    Ok((
        StatusCode::CREATED,
        Json(state.manager.import_image(request).await?),
    ))
}

#[utoipa::path(post, path = "/v1/images/build", tag = "images", request_body = BuildImageRequest,
    responses((status = 201, body = Image), (status = 422, body = ErrorBody)))]
async fn build_image(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<BuildImageRequest>,
) -> Result<(StatusCode, Json<Image>), HttpError> {
    Ok((
        StatusCode::CREATED,
        Json(state.manager.build_image(request).await?),
    ))
}

#[utoipa::path(get, path = "/v1/images/build/progress", tag = "images",
    responses((status = 200, description = "The running build's latest step (running=false when none)", body = BuildProgress)))]
async fn build_progress(State(state): State<AppState>) -> Json<BuildProgress> {
    Json(state.manager.build_progress())
}

#[utoipa::path(get, path = "/v1/kernels", tag = "images",
    responses((status = 200, body = [Kernel])))]
async fn list_kernels(State(state): State<AppState>) -> Result<Json<Vec<Kernel>>, HttpError> {
    Ok(Json(state.manager.list_kernels().await?))
}

#[utoipa::path(post, path = "/v1/kernels/import", tag = "images", request_body = ImportKernelRequest,
    responses((status = 201, body = Kernel), (status = 400, body = ErrorBody)))]
async fn import_kernel(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<ImportKernelRequest>,
) -> Result<(StatusCode, Json<Kernel>), HttpError> {
    Ok((
        StatusCode::CREATED,
        Json(state.manager.import_kernel(request).await?),
    ))
}

#[utoipa::path(post, path = "/v1/kernels/build", tag = "images", request_body = BuildKernelRequest,
    responses((status = 201, body = Kernel), (status = 422, body = ErrorBody)))]
async fn build_kernel(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<BuildKernelRequest>,
) -> Result<(StatusCode, Json<Kernel>), HttpError> {
    Ok((
        StatusCode::CREATED,
        Json(state.manager.build_kernel(request).await?),
    ))
}

#[utoipa::path(get, path = "/v1/kernels/build/progress", tag = "images",
    responses((status = 200, description = "The running kernel build (running=false when none)", body = KernelBuildProgress)))]
async fn kernel_build_progress(State(state): State<AppState>) -> Json<KernelBuildProgress> {
    Json(state.manager.kernel_build_progress())
}

#[utoipa::path(get, path = "/v1/kernels/{name}", tag = "images",
    params(("name" = String, Path, description = "Kernel name")),
    responses((status = 200, body = Kernel), (status = 404, body = ErrorBody)))]
async fn get_kernel(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Kernel>, HttpError> {
    Ok(Json(state.manager.get_kernel(&name).await?))
}

#[utoipa::path(delete, path = "/v1/kernels/{name}", tag = "images",
    params(("name" = String, Path, description = "Kernel name")),
    responses((status = 204, description = "Removed"),
              (status = 404, body = ErrorBody),
              (status = 409, description = "An image uses it", body = ErrorBody)))]
async fn remove_kernel(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, HttpError> {
    state.manager.remove_kernel(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/images/push", tag = "images", request_body = PushRequest,
    responses((status = 200, body = TransferResult), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 422, description = "The registry refused or failed", body = ErrorBody)))]
async fn push_image(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<PushRequest>,
) -> Result<Json<TransferResult>, HttpError> {
    Ok(Json(state.manager.push_image(request).await?))
}

#[utoipa::path(post, path = "/v1/kernels/push", tag = "images", request_body = PushRequest,
    responses((status = 200, body = TransferResult), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn push_kernel(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<PushRequest>,
) -> Result<Json<TransferResult>, HttpError> {
    Ok(Json(state.manager.push_kernel(request).await?))
}

#[utoipa::path(post, path = "/v1/images/pull", tag = "images", request_body = PullRequest,
    responses((status = 200, body = PullResult), (status = 400, body = ErrorBody),
              (status = 422, description = "Unreachable, refused, or corrupt data (nothing stored)", body = ErrorBody)))]
async fn pull_image(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<PullRequest>,
) -> Result<Json<PullResult>, HttpError> {
    Ok(Json(state.manager.pull_image(request).await?))
}

#[utoipa::path(post, path = "/v1/kernels/pull", tag = "images", request_body = PullRequest,
    responses((status = 200, body = PullResult), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn pull_kernel(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<PullRequest>,
) -> Result<Json<PullResult>, HttpError> {
    Ok(Json(state.manager.pull_kernel(request).await?))
}

#[utoipa::path(get, path = "/v1/transfers/{id}", tag = "images",
    params(("id" = String, Path, description = "The transfer id the client chose")),
    responses((status = 200, description = "The transfer's counters (running=false when none)", body = TransferProgress)))]
async fn transfer_progress(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Json<TransferProgress> {
    Json(state.manager.transfer_progress(&id))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "banger daemon API",
        description = "HTTP+JSON over the Unix socket \
        $BANGER_RUNTIME_DIR/bangerd.sock. Every response carries X-Banger-Op-Id; every error \
        has the ErrorBody shape."
    ),
    paths(
        status,
        shutdown,
        doctor,
        list_vms,
        create_vm,
        stats,
        get_vm,
        set_vm,
        remove_vm,
        start_vm,
        stop_vm,
        pause_vm,
        resume_vm,
        suspend_vm,
        ssh_info,
        console,
        list_ports,
        change_ports,
        clone_vm,
        list_snapshots,
        create_snapshot,
        restore_snapshot,
        remove_snapshot,
        list_images,
        get_image,
        remove_image,
        import_image,
        build_image,
        build_progress,
        list_kernels,
        import_kernel,
        build_kernel,
        kernel_build_progress,
        get_kernel,
        remove_kernel,
        push_image,
        pull_image,
        push_kernel,
        pull_kernel,
        transfer_progress,
        prepare_workspace,
        workspace_status,
        export_workspace,
        prepare_progress,
        copy,
        network_status,
        network_down,
        ssh_config
    ),
    components(schemas(
        DiskFsck,
        ExecDefaults,
        FsckResult,
        LastStop,
        SetVmRequest,
        SetVmResult,
        StartFsck,
        StopKind,
        VmStats,
        DiskUsage,
        NetCounters,
        GuestStats,
        FsUsage,
        PrepareWorkspaceRequest,
        PrepareResult,
        PrepareProgress,
        WorkspaceStatus,
        WorkspaceDiff,
        ExportWorkspaceRequest,
        ExportResult,
        CopyRequest,
        CopyResult,
        CopyDirection,
        Vm,
        SnapshotSummary,
        VmSnapshot,
        SnapshotList,
        CreateSnapshotRequest,
        CloneVmRequest,
        VmSpec,
        VmState,
        VmRuntime,
        CreateVmRequest,
        DaemonStatus,
        DoctorReport,
        DoctorCheck,
        CheckStatus,
        NetworkStatus,
        VmNetwork,
        PortMapping,
        PortProto,
        PortChangeRequest,
        PortList,
        LeaseInfo,
        SshConfigRequest,
        SshConfigResult,
        ErrorBody,
        ApiError,
        ErrorCode,
        LifecycleResult,
        StopVmRequest,
        SshInfo,
        ConsoleChunk,
        Image,
        Kernel,
        ImportImageRequest,
        ImportKernelRequest,
        BuildKernelRequest,
        KernelBuildProgress,
        KernelCapabilities,
        BuildImageRequest,
        ImageKernel,
        BuildProgress,
        PushRequest,
        PullRequest,
        PullResult,
        PullPolicy,
        RegistryAccess,
        TransferResult,
        TransferProgress
    ))
)]
struct ApiDoc;

/// The OpenAPI description as YAML (what docs/api.yaml holds).
pub fn openapi_yaml() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = banger_core::VERSION.to_owned();
    // Keep the file independent of the build's Cargo metadata.
    doc.info.license = None;
    doc.info.contact = None;
    doc.to_yaml()
        .unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

#[cfg(test)]
mod tests {
    /// docs/api.yaml must be what the code describes. `BANGER_BLESS=1 cargo test` rewrites it.
    #[test]
    fn api_yaml_matches_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.yaml");
        let generated = super::openapi_yaml();
        if std::env::var_os("BANGER_BLESS").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == generated,
            "docs/api.yaml is stale; run `BANGER_BLESS=1 cargo test -p bangerd api_yaml` and commit it"
        );
    }

    #[test]
    fn op_ids_are_short_tokens() {
        assert!(super::valid_op_id("abc-123_X"));
        assert!(!super::valid_op_id(""));
        assert!(!super::valid_op_id("a b"));
        assert!(!super::valid_op_id(&"a".repeat(65)));
    }
}
