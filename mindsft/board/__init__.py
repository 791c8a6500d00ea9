"""The web board: a local page over the command lines (prepare, train, watch, evaluate, chat,
export). It builds each command line from the page's fields, shows it, and runs it as a separate
process exactly as a person would type it, so whatever was done on the page can be repeated by
hand. `server.py` is the HTTP layer, `forms.py` turns fields into command lines and YAML,
`jobs.py` runs and finds the processes, `preview.py` reads models and data for the Prepare tab,
`chat.py` loads the chat tab's model into a generation session (`mindsft.session`)."""
