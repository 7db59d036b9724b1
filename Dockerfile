# The image the KubeRay RayJob (k8s/rayjob.yaml) runs: Ray plus this project installed with
# its GPU, model and S3 extras, code and configs under /app.
FROM rayproject/ray:2.60.0-py311-gpu
COPY --chown=ray:users . /app
RUN python -m pip install --no-cache-dir -e '/app[gpu,models,s3]'
WORKDIR /app
