"""doctune on Kubeflow Pipelines: the components (the repository's `components/` folder) and the pipelines and
command line (`pipelines/`). Kept apart from `doctune`, which never imports kfp."""
