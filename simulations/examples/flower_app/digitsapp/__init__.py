"""An ordinary Flower app (CNN with BatchNorm on scikit-learn's digits) and the same app
with fedquant compression: compare client_app.py with client_app_fedquant.py and
server_app.py with server_app_fedquant.py."""
