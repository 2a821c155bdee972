# Environment for msg-train on a GPU cluster; sourced by every launch script in examples/.
# Each setting is only a default: export your own value before launching to replace it.

# Python's output unbuffered, so a job's log shows each step when it happens, not at exit.
export PYTHONUNBUFFERED=1
# CPU threads per process for host work (data, checkpoint serialisation).  torchrun defaults to 1;
# a few leave room for the data path without oversubscribing the node (8 ranks x 4 = 32 cores).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
# The tokenizers library's own thread pool is not needed at training time (data is preprocessed)
# and warns when a process forks after using it.
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

# NCCL.  WARN prints problems (a rank that lost its peer, an IB error) and nothing else; use INFO
# once to see which transport (NVLink, IB, sockets) each ring really uses.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# A collective that fails or times out tears the process down (so the launcher stops the job)
# instead of leaving every other rank blocked in the next collective.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Which network NCCL uses between nodes is cluster-specific; set these where the default choice is
# wrong (e.g. NCCL picks a management Ethernet port): the InfiniBand HCAs, e.g. mlx5_0,mlx5_1, and
# the interface for NCCL's bootstrap and socket fallback, e.g. ib0 or eth0.
if [ -n "${MSG_NCCL_IB_HCA:-}" ]; then
    export NCCL_IB_HCA="$MSG_NCCL_IB_HCA"
fi
if [ -n "${MSG_NCCL_SOCKET_IFNAME:-}" ]; then
    export NCCL_SOCKET_IFNAME="$MSG_NCCL_SOCKET_IFNAME" GLOO_SOCKET_IFNAME="$MSG_NCCL_SOCKET_IFNAME"
fi
# Left to NCCL's own topology detection on purpose: NCCL_NET_GDR_LEVEL, NCCL_ALGO, NCCL_PROTO.
