"""Package data: the KubeRay manifests (``*.yaml``) and the vendored KubeRay CRD schemas
(``schemas/kuberay/``), read by ``deploy/k8s.py`` through ``importlib.resources``. No code."""
