# CPU image of the captioner HTTP service: web page at /, API at POST /v1/captions, OpenAPI docs at /docs.
#   docker build -t captioner .
#   docker run --rm -p 8000:8000 captioner
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A JRE for the official COCO metrics (`captioner evaluate` inside the image); serving does not use it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends default-jre-headless \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# CPU wheels first: PyPI's default Linux torch wheel pulls in gigabytes of CUDA libraries this image never uses.
# `pip install ".[train]"` below then finds torch==2.14.1 / torchvision==0.29.1 already satisfied. (The service
# still decodes with torch; `pip install .` alone is the torch-free install, which so far runs `captioner caption`.)
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
# The shipped model is package data (captioner/weights/): `pip install .` installs it with the code.
COPY captioner ./captioner
COPY service ./service
RUN pip install ".[train]"

ENV CAPTIONER_DEVICE=cpu

RUN useradd --create-home --uid 1000 captioner
USER captioner

EXPOSE 8000
# slim has no curl: ask with Python. The model loads before the server accepts connections, so once /healthz
# answers the service is ready; start-period covers that load.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["uvicorn", "service.app:app", "--host", "0.0.0.0", "--port", "8000"]
