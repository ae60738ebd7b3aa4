# CPU image of the captioner HTTP service: web page at /, API at POST /v1/captions, OpenAPI docs at /docs.
#   docker build -t captioner .
#   docker run --rm -p 8000:8000 captioner
# The torch-free install (`pip install .`): the service runs the shipped model's exported graphs on ONNX Runtime
# (engine "slim", captioner/weights/onnx/). Training and evaluation need the full install (`.[train]`), not this image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only the service's entry point is copied; uvicorn imports it from /app.
COPY service ./service
# The package is installed from the build context through a bind mount, not copied in: the image then holds one
# copy of the code and of the shipped model's graphs (captioner/weights/onnx/, package data) in site-packages, and
# no pip build folder (~70 MB less than COPY + `pip install .`). The check fails the build if torch came along.
RUN --mount=type=bind,target=/src,rw pip install /src \
 && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

RUN useradd --create-home --uid 1000 captioner
USER captioner

EXPOSE 8000
# slim has no curl: ask with Python. The model loads before the server accepts connections, so once /healthz
# answers the service is ready; start-period covers that load.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["uvicorn", "service.app:app", "--host", "0.0.0.0", "--port", "8000"]
