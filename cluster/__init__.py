"""Scale-out configuration: the container images, the KubeRay manifests and their static checks.

``python -m cluster.validate`` checks ``ray_config.yaml``, ``cluster/k8s/*.yaml`` and the Dockerfiles
without a cluster, a container engine or the network.
"""
