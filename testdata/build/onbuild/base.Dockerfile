FROM busybox:local
ONBUILD RUN echo triggered > /onbuild-ran
CMD ["base-cmd"]
