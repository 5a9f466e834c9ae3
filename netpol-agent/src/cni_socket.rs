//! The unix socket between the CNI plugin and the running agent, the way cilium-cni asks
//! cilium-agent for an endpoint: one JSON line each way. The plugin sends the pod as its ADD
//! wired it (a [`CniPod`]); the agent records it, runs a reconcile pass and answers once the
//! pass is done, saying whether the pod's own entry is written or its interface stays closed.
//!
//! Owns the wire format and both ends of the connection; what a request does to the kernel is
//! `run`'s and `reconcile`'s business. A bad request gets an error reply, never more.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
    sync::{mpsc, oneshot},
};
use tracing::{debug, warn};

use crate::cni_pods::CniPod;

/// Longer requests are refused: a record is a few hundred bytes.
const MAX_REQUEST: u64 = 64 * 1024;

/// What became of the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The pod's entry, from its policies, is written and its interface carries the programs.
    Programmed,
    /// The interface stays closed (deny all): the agent does not know the pod yet, or could
    /// not program this time. A later pass programs it.
    Held,
    /// The request was refused (malformed, or its interface is not there).
    Refused,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub outcome: Outcome,
    pub message: String,
}

/// A request as the agent's loop receives it, with where to send the answer.
pub type Pending = (CniPod, oneshot::Sender<Reply>);

#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("connecting to {path}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("talking to the agent on {path}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the agent's reply on {path} is not JSON: {reply:?}")]
    Reply { path: String, reply: String },
}

/// The plugin's side: sends the pod, waits for the reply, at most `timeout` for each step.
pub fn ask(socket: &Path, pod: &CniPod, timeout: Duration) -> Result<Reply, AskError> {
    let path = socket.display().to_string();
    let stream = UnixStream::connect(socket).map_err(|source| AskError::Connect {
        path: path.clone(),
        source,
    })?;
    let io_err = |source| AskError::Io {
        path: path.clone(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let mut line = serde_json::to_vec(pod).expect("a record serialises");
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io_err)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(io_err)?;
    serde_json::from_str(reply.trim()).map_err(|_| AskError::Reply {
        path: path.clone(),
        reply: reply.trim().to_string(),
    })
}

/// Binds the socket (0600: only root may ask), replacing a stale one a previous agent left.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The agent's side: accepts connections for ever, each on its own task, and hands valid
/// requests to the loop through `requests`.
pub async fn serve(listener: UnixListener, requests: mpsc::Sender<Pending>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let requests = requests.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, requests).await {
                        debug!(error = %e, "CNI socket connection ended early");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "accepting on the CNI socket failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// How long a request may take to arrive, and to be answered (a pass, plus the debounce).
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

async fn answer(stream: tokio::net::UnixStream, requests: mpsc::Sender<Pending>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut limited = tokio::io::BufReader::new(read.take(MAX_REQUEST));
    let read = tokio::time::timeout(READ_TIMEOUT, limited.read_line(&mut line)).await;
    let reply = match read {
        Err(_) => refused("no request within 5 s".into()),
        Ok(Err(e)) => refused(format!("reading the request: {e}")),
        Ok(Ok(_)) => match serde_json::from_str::<CniPod>(line.trim()) {
            Err(e) => refused(format!("not a pod record: {e}")),
            Ok(pod) => match pod.validate() {
                Err(e) => refused(e),
                Ok(()) => forward(pod, &requests).await,
            },
        },
    };
    let mut out = serde_json::to_vec(&reply).expect("a reply serialises");
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

fn refused(message: String) -> Reply {
    warn!(%message, "CNI request refused");
    Reply {
        outcome: Outcome::Refused,
        message,
    }
}

async fn forward(pod: CniPod, requests: &mpsc::Sender<Pending>) -> Reply {
    let (tx, rx) = oneshot::channel();
    if requests.send((pod, tx)).await.is_err() {
        return Reply {
            outcome: Outcome::Held,
            message: "the agent is stopping".into(),
        };
    }
    match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
        Ok(Ok(reply)) => reply,
        _ => Reply {
            outcome: Outcome::Held,
            message: "no pass finished in time".into(),
        },
    }
}
