"""The watch machinery every controller would share: none of it is LLMBackend logic.

Named for what it is, the way cert-manager's `pkg/controller` (informers, queues, leader
election) sits apart from each controller's `sync.go`, and Kubernetes' own
"apimachinery": the watch store (`store`), the work queue (`workqueue`), complete
listings seen whole (`relist`), kopf's index gate made linear (`indexgate`) and the check
that the kopf internals both wrap are the ones they were written against (`kopfcheck`),
leader election on a Lease (`leader`), one request to the API server and the encodings
of server-side apply (`rest`), and the Prometheus exposition of a controller's health
(`metrics`). Not `watch/`: leader election, requests and metrics are no watches.

Layering is one way: the LLMBackend controller (`fabric_operator.controller`) imports
from here, nothing here imports from it or from any other part of fabric_operator
(tests/unit/test_layers.py checks). What a module needs to know of the objects it holds
is passed in: the Store is told which label names an object's owner.
"""
