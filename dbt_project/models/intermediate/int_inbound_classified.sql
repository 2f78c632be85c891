-- Every inbound SMS, classified: a keyword (STOP, START, HELP) as the provider recognised
-- it, else whether the text reads as a complaint: abuse or a spam report, or an opt-out in
-- free text ("stop texting me", "не пишите мне"). The patterns are the seed
-- `complaint_patterns` (lower-case fragments matched anywhere in the lower-cased text).

with

inbound as (

    select * from {{ ref('stg_ops__inbound_messages') }}

),

patterns as (

    select * from {{ ref('complaint_patterns') }}

),

matches as (

    select
        inbound.inbound_id,
        max(case when patterns.complaint_kind = 'abuse' then 1 else 0 end) as is_abuse,
        max(case when patterns.complaint_kind = 'opt_out_text' then 1 else 0 end) as is_opt_out_text
    from inbound
    inner join patterns
        on lower(inbound.body) like '%' || patterns.pattern || '%'
    where inbound.keyword is null
    group by 1

),

final as (

    select
        inbound.inbound_id,
        inbound.provider,
        inbound.from_e164,
        inbound.body,
        inbound.keyword,
        inbound.contact_id,
        inbound.in_reply_to_message_id,
        inbound.received_at,
        matches.inbound_id is not null as is_complaint,
        case
            when matches.is_abuse = 1 then 'abuse'
            when matches.is_opt_out_text = 1 then 'opt_out_text'
        end as complaint_kind
    from inbound
    left join matches
        on inbound.inbound_id = matches.inbound_id

)

select * from final
