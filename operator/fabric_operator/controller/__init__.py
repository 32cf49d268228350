"""The LLMBackend controller: what to do about an LLMBackend, built on `machinery`.

Named as kubebuilder names a kind's reconciler (`internal/controller/`): the operator
has one kind, and this package is its controller. It holds the kopf wiring of its
watches (`handlers`), the running controller (`runtime`), the reconcile itself
(`reconciler`), the decisions it makes without the API (`diff`, `lists`, `status`,
`diagnose`) and its calls to the API server (`kube`: its child kinds, its status, its
Events). The generic parts (watch store, work queue, leader election, the request
layer, metrics) are in `fabric_operator.machinery`, which never imports from here.

`runtime` stays here though it runs the workers: most of it is which LLMBackend an
event concerns, when a backend's children are orphans and what /healthz reports; the
generic rest (workers over the queue, writes drained at stop) is some sixty lines, to
move into `machinery` when a second controller needs it.
"""
