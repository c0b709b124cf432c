# The Ruby stomp gem (Debian ruby-stomp) against stompd: connect (with and without login),
# send, subscribe, ack, transaction, for STOMP 1.0, 1.1 and 1.2. Prints TAP lines
# (`ok - NAME` / `not ok - NAME`) that ../run.sh counts. Every receive is bounded.
require 'stomp'
require 'securerandom'
require 'timeout'

HOST = ENV.fetch('STOMPD_HOST', '127.0.0.1')
PORT = Integer(ENV.fetch('STOMPD_PORT', '61613'))
AUTH_PORT = ENV['STOMPD_AUTH_PORT'].to_s.empty? ? nil : Integer(ENV['STOMPD_AUTH_PORT'])
USER = ENV.fetch('STOMPD_USER', 'interop')
PASSCODE = ENV.fetch('STOMPD_PASSCODE', '')
FULL_BROKER = ENV.fetch('STOMPD_FLAVOR', 'stompd') == 'stompd'
WAIT_S = 5

$failed = 0

def check(name)
  Timeout.timeout(30) { yield }
  puts "ok - ruby: #{name}"
rescue Exception => e # rubocop:disable Lint/RescueException -- report everything, keep going
  $failed += 1
  puts "not ok - ruby: #{name}"
  puts "#   #{e.class}: #{e.message}"
  e.backtrace.first(5).each { |line| puts "#   #{line}" }
end

def skip(name, why)
  puts "# SKIP ruby: #{name} (#{why})"
end

def fresh(kind, label)
  "/#{kind}/interop-rb-#{label}-#{SecureRandom.hex(4)}"
end

def connect(version, port: PORT, login: '', passcode: '')
  Stomp::Connection.new(
    hosts: [{ login: login, passcode: passcode, host: HOST, port: port, ssl: false }],
    reliable: false,
    connect_timeout: WAIT_S,
    connread_timeout: WAIT_S,
    connect_headers: { 'accept-version' => version, 'host' => 'localhost' },
    closed_check: false
  )
end

def receive(conn)
  Timeout.timeout(WAIT_S) { conn.receive }
rescue Timeout::Error
  raise "no frame within #{WAIT_S} s"
end

def message(conn)
  frame = receive(conn)
  raise "expected MESSAGE, got #{frame.command} #{frame.headers.inspect}" unless frame.command == 'MESSAGE'
  frame
end

def subscribe(conn, dest, id, ack = 'auto')
  receipt = "sub-#{SecureRandom.hex(4)}"
  conn.subscribe(dest, { ack: ack, receipt: receipt }, id)
  frame = receive(conn)
  raise "expected RECEIPT #{receipt}, got #{frame.command} #{frame.headers.inspect}" unless
    frame.command == 'RECEIPT' && frame.headers['receipt-id'] == receipt
end

def ack(conn, version, frame, extra = {})
  case version
  when '1.2' then conn.ack(frame.headers['ack'], extra)
  when '1.1' then conn.ack(frame.headers['message-id'], extra.merge(subscription: frame.headers['subscription']))
  else conn.ack(frame.headers['message-id'], extra)
  end
end

def sync(conn)
  receipt = "sync-#{SecureRandom.hex(4)}"
  conn.begin(receipt, receipt: receipt)
  frame = receive(conn)
  raise "expected RECEIPT #{receipt}, got #{frame.command}" unless frame.headers['receipt-id'] == receipt

  conn.abort(receipt)
end

def expect(actual, wanted, what)
  raise "#{what}: wanted #{wanted.inspect}, got #{actual.inspect}" unless actual == wanted
end

%w[1.0 1.1 1.2].each do |version|
  check("#{version} connect negotiates the version (spec: Connecting)") do
    conn = connect(version)
    raise "not open: #{conn.connection_frame.inspect}" unless conn.open?

    expect(conn.protocol, version, 'negotiated protocol')
    conn.disconnect
  end

  check("#{version} send, subscribe, receive on a topic (spec: SEND, SUBSCRIBE, MESSAGE)") do
    conn = connect(version)
    dest = fresh('topic', 'basic')
    subscribe(conn, dest, 'rb-1')
    conn.publish(dest, "hello from ruby #{version}", 'x-lang' => 'ruby')
    frame = message(conn)
    expect(frame.body, "hello from ruby #{version}", 'body')
    expect(frame.headers['destination'], dest, 'destination')
    expect(frame.headers['x-lang'], 'ruby', 'user header') if FULL_BROKER
    conn.disconnect
  end

  unless FULL_BROKER
    skip("#{version} queue, ack, transaction", 'needs the full broker')
    next
  end

  check("#{version} queue keeps a message until a consumer comes (spec: SEND)") do
    dest = fresh('queue', 'stored')
    producer = connect(version)
    producer.publish(dest, 'stored', receipt: 'p1')
    expect(receive(producer).headers['receipt-id'], 'p1', 'receipt')
    producer.disconnect
    consumer = connect(version)
    subscribe(consumer, dest, 'rb-2')
    expect(message(consumer).body, 'stored', 'body')
    consumer.disconnect
  end

  check("#{version} client ack: unacked is redelivered, acked is gone (spec: ACK)") do
    dest = fresh('queue', 'ack')
    conn = connect(version)
    conn.publish(dest, 'ack me')
    subscribe(conn, dest, 'rb-3', 'client')
    expect(message(conn).body, 'ack me', 'first delivery')
    conn.disconnect(receipt: 'bye')

    again = connect(version)
    subscribe(again, dest, 'rb-4', 'client')
    frame = message(again)
    expect(frame.body, 'ack me', 'redelivery')
    ack(again, version, frame)
    sync(again)
    again.disconnect(receipt: 'bye')

    last = connect(version)
    subscribe(last, dest, 'rb-5', 'client')
    last.publish(dest, 'sentinel')
    expect(message(last).body, 'sentinel', 'first message after the ACK')
    last.disconnect
  end

  check("#{version} transaction: commit delivers, abort discards (spec: BEGIN, COMMIT, ABORT)") do
    dest = fresh('queue', 'tx')
    conn = connect(version)
    subscribe(conn, dest, 'rb-6')
    conn.begin('t-abort')
    conn.publish(dest, 'aborted', transaction: 't-abort')
    conn.abort('t-abort')
    conn.begin('t-commit')
    conn.publish(dest, 'committed', transaction: 't-commit')
    conn.publish(dest, 'outside')
    expect(message(conn).body, 'outside', 'the non-transactional message first')
    conn.commit('t-commit')
    expect(message(conn).body, 'committed', 'the committed message')
    conn.disconnect
  end

  if version != '1.0'
    check("#{version} nack redelivers (spec: NACK)") do
      dest = fresh('queue', 'nack')
      conn = connect(version)
      subscribe(conn, dest, 'rb-7', 'client-individual')
      conn.publish(dest, 'nack me')
      frame = message(conn)
      if version == '1.2'
        conn.nack(frame.headers['ack'])
      else
        conn.nack(frame.headers['message-id'], subscription: frame.headers['subscription'])
      end
      again = message(conn)
      expect(again.body, 'nack me', 'redelivery')
      ack(conn, version, again)
      conn.disconnect
    end
  end

  if AUTH_PORT
    check("#{version} login accepted, wrong passcode refused (spec: CONNECT, ERROR)") do
      good = connect(version, port: AUTH_PORT, login: USER, passcode: PASSCODE)
      raise 'login refused' unless good.open?

      good.disconnect
      bad = connect(version, port: AUTH_PORT, login: USER, passcode: "#{PASSCODE}-wrong")
      frame = bad.connection_frame
      expect(frame && frame.command, 'ERROR', 'answer to a wrong passcode')
      raise 'ERROR without a message header' if frame.headers['message'].to_s.empty?
    end
  else
    skip("#{version} login", 'no auth broker')
  end
end

def pop(queue, what)
  Timeout.timeout(WAIT_S) { queue.pop }
rescue Timeout::Error
  raise "no #{what} within #{WAIT_S} s"
end

if FULL_BROKER
  %w[1.0 1.2].each do |version|
    check("#{version} Stomp::Client (threaded listener): receipts, client ack, transaction (spec: RECEIPT, ACK, COMMIT)") do
      client = Stomp::Client.new(
        hosts: [{ login: '', passcode: '', host: HOST, port: PORT, ssl: false }],
        reliable: false,
        connect_timeout: WAIT_S,
        connect_headers: { 'accept-version' => version, 'host' => 'localhost' }
      )
      dest = fresh('queue', 'client')
      messages = Queue.new
      receipts = Queue.new
      client.subscribe(dest, ack: 'client', id: 'rbc-1') { |msg| messages << msg }
      client.publish(dest, 'first') { |receipt| receipts << receipt.headers['receipt-id'] }
      raise 'empty receipt-id' if pop(receipts, 'RECEIPT for SEND').to_s.empty?

      msg = pop(messages, 'MESSAGE')
      expect(msg.body, 'first', 'body')
      client.acknowledge(msg) { |receipt| receipts << receipt.headers['receipt-id'] }
      pop(receipts, 'RECEIPT for ACK')
      client.begin('rbc-tx')
      client.publish(dest, 'in tx', transaction: 'rbc-tx')
      client.publish(dest, 'outside')
      expect(pop(messages, 'MESSAGE').body, 'outside', 'the non-transactional message first')
      client.commit('rbc-tx')
      tx_msg = pop(messages, 'the committed MESSAGE')
      expect(tx_msg.body, 'in tx', 'the committed message')
      client.acknowledge(tx_msg)
      client.close
    end
  end
end

puts "# ruby-stomp #{Stomp::Version::STRING}: #{$failed} failed"
exit($failed.zero? ? 0 : 1)
