"""Stage 1b, Kubernetes: pools whose endpoints come from the cluster (`serve --kubernetes`).

In: the file's Config (its pools with `kubernetes:`) and the API server. Out: the same
Config with those pools' endpoints filled in (then the admin overlay goes on top), a
re-publish whenever the cluster changes, and the InferencePool statuses.

`client` (where the cluster is, as kubectl finds it; GET, watch and merge-patch over
aiohttp), `watch` (one collection listed and watched: bookmarks, 410 re-lists, back-off,
last known objects kept), `translate` (EndpointSlices and InferencePool Pods to
endpoints), `status` (the InferencePool `status.parents` entry), `source` (the watches a
config needs, the fill, the debounced publish) and `collector` (its Prometheus series).
It sits with the config stage: it imports config types and nothing of xDS, resources or
the admin API.

Client choice (bench/kubernetes_clients.py, 2 cores, Python 3.11; kubernetes_asyncio 36.1.0,
lightkube 1.0.1): this package's own aiohttp client took 0 s and 0 MiB to import on top
of the aiohttp the control plane already loads, kubernetes_asyncio 0.30 s and 38 MiB,
lightkube 0.09 s and 6.8 MiB (it brings httpx); listing 1,000 slices of 8 endpoints took
0.07 s, 0.67 s (it builds model objects) and 0.26 s. On watch semantics, lightkube has no
way to ask for bookmarks (its watch() sends no allowWatchBookmarks), reports an HTTP 410
as a plain httpx error rather than the ApiError its own 410 handling checks, and its
retrying on_error re-watches without a resourceVersion after a 410, so an object
deleted in the gap is never removed (the bench ends with a stale slice).
kubernetes_asyncio handles bookmarks and 410s correctly once the caller re-lists (it retries
a 410 ERROR once with the same expired version first), so it would have been acceptable;
it lost on cost, with no correctness to gain. The price of our own client is the
kubeconfig reading: tokens, token files, client certificates and exec plugins are
supported; auth-provider (the legacy gcp/oidc plugins) is not.
"""
