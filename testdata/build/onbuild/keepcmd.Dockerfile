FROM onbase:1
CMD ["own-cmd"]
ENTRYPOINT ["/bin/echo"]
