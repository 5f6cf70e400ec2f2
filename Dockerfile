FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY vel ./vel
COPY examples ./examples
RUN pip install --no-cache-dir ".[examples]"
ENTRYPOINT ["vel"]
